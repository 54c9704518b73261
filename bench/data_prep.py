"""Throughput of `kmoe data build`: MB/s per core for each step, each stage and the whole build, against two
baselines measured in the same run, and the wall time of the build with 1 and with `--workers` processes.

    .venv/bin/python bench/data_prep.py [--config configs/data/demo.yaml] [--tasks 8] [--workers 2] [--max-mb X]

Baselines: `json.loads` over the raw JSONL records (the floor any pipeline pays to read its input) and raw
sentencepiece encoding (`SentencePieceProcessor.encode`, one document at a time) of the kept text with the
tokenizer the build trained (the limit for the shards stage, which also frames, budgets and writes the tokens).
Each step is timed alone in this process over the documents that reach it. The build then runs with one
worker (every task in this process, so its CPU time per stage is that stage's cost per core) and trains its
tokenizer as the config says; a second build with `--workers` processes reuses that tokenizer, and both
builds' walls are compared over the same stages (all but tokenizer training). CPU time, not wall time, gives
the per-core rates, so other load on the machine does not skew them; the wall comparison does feel it.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.config import load_data_config  # noqa: E402
from data_prep.pipeline import build, resolve_sources, text_pipeline  # noqa: E402
from data_prep.records import Doc  # noqa: E402
from data_prep.sources.files import list_units, read_unit  # noqa: E402
from data_prep.steps.base import Drop, StepCounts  # noqa: E402
from data_prep.steps.dedup import DedupStep  # noqa: E402


def mb(docs: list[Doc]) -> float:
    return sum(len(d.raw) if d.raw is not None else len(d.text.encode()) for d in docs) / 1e6


def time_steps(cfg, roots: list[str], out: Path) -> tuple[list[tuple[str, float, float]], float, float]:
    """[(step, MB in, CPU seconds)], json.loads baseline CPU seconds, total input MB."""
    docs = [
        doc
        for unit in list_units(cfg.sources, [Path(r) for r in roots])
        for doc in read_unit(unit, cfg.sources[unit.source_index], Path(roots[unit.source_index]))
    ]
    total_mb = mb(docs)
    t0 = time.process_time()
    for d in docs:
        if d.kind == "jsonl":
            with contextlib.suppress(ValueError):
                json.loads(d.raw)
    baseline = time.process_time() - t0
    jsonl_mb = sum(len(d.raw) for d in docs if d.kind == "jsonl") / 1e6
    steps = [s for s in text_pipeline(cfg, out, roots)[1:-1]] + [DedupStep(out, cfg.dedup)]
    rows = []
    for step in steps:
        step.setup()
        size, counts, kept = mb(docs), StepCounts(), []
        t0 = time.process_time()
        if isinstance(step, DedupStep):
            step.prepare(docs)  # a document's fate depends on all the others: decided first, timed with it
        for d in docs:
            r = step.apply(d, counts)
            if not isinstance(r, Drop):
                kept.append(r)
        rows.append((step.name, size, time.process_time() - t0))
        docs = kept
    return rows, baseline * total_mb / jsonl_mb, total_mb  # baseline scaled to the whole input


def timer(into: dict[str, tuple[float, float]]):
    @contextlib.contextmanager
    def stage(name: str):
        c0, t0 = time.process_time(), time.perf_counter()
        yield
        into[name] = (time.process_time() - c0, time.perf_counter() - t0)

    return stage


def texts(files) -> list[str]:
    return [json.loads(line)["text"] for f in files for line in gzip.open(f, "rt", encoding="utf-8")]


def stage_inputs(out: Path, raw_mb: float) -> dict[str, float]:
    """MB each stage reads: raw input, the text stage's survivors, the kept corpus (twice), the outputs."""
    size = lambda ts: sum(len(t.encode()) for t in ts) / 1e6  # noqa: E731
    kept = size(texts(sorted((out / "corpus" / "kept").rglob("*.jsonl.gz"))))
    hashed = sum(
        p.stat().st_size
        for d in ("corpus", "shards", "tokenizer")
        for p in (out / d).rglob("*")
        if p.is_file()
    )
    return {"text": raw_mb, "dedup": size(texts(sorted((out / "work" / "text").glob("*.jsonl.gz")))),
            "tokenizer": kept, "shards": kept, "finalize": hashed / 1e6}  # fmt: skip


def disk_mb(out: Path) -> dict[str, float]:
    """MB on disk of the text stage's output, the kept and removed corpus and the token shards."""
    folders = {"work/text": out / "work" / "text", "corpus/kept": out / "corpus" / "kept",
               "corpus/removed": out / "corpus" / "removed", "shards": out / "shards"}  # fmt: skip
    return {k: sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / 1e6 for k, d in folders.items()}


def sp_encode_rate(out: Path) -> tuple[float, int]:
    """MB/s per core of raw sentencepiece encoding of the kept text, and the tokens it gives."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer" / "tokenizer.model"))
    docs = texts(sorted((out / "corpus" / "kept").rglob("*.jsonl.gz")))
    t0 = time.process_time()
    n = sum(len(sp.encode(t)) for t in docs)
    return sum(len(t.encode()) for t in docs) / 1e6 / (time.process_time() - t0), n


def report(rows, base_s, total_mb, times1, times_n, inputs, sp_rate, workers, tasks, manifest, disk) -> None:
    base = total_mb / base_s
    print(
        f"input {total_mb:.1f} MB; json.loads {base:.1f} MB/s per core; sentencepiece encode {sp_rate:.2f} MB/s per core"
    )
    print(f"\n{'step':<10} {'MB in':>8} {'CPU s':>8} {'MB/s/core':>10} {'/json':>8}")
    for name, size, secs in rows:
        print(f"{name:<10} {size:>8.1f} {secs:>8.2f} {size / secs:>10.2f} {size / secs / base:>7.3f}x")
    print(f"\n{tasks} tasks per stage; CPU s with 1 worker; wall s with 1 and {workers} workers")
    print(
        f"{'stage':<10} {'MB in':>8} {'CPU s':>8} {'MB/s/core':>10} {'/json':>8} {'/sp enc':>8} {'wall 1':>8} {f'wall {workers}':>8}"
    )
    for name, (cpu, wall) in times1.items():
        rate = inputs[name] / cpu
        w_n = f"{times_n[name][1]:>8.1f}" if name in times_n else f"{'-':>8}"
        sp = f"{rate / sp_rate:>7.3f}x" if name == "shards" else f"{'':>8}"
        print(
            f"{name:<10} {inputs[name]:>8.1f} {cpu:>8.2f} {rate:>10.2f} {rate / base:>7.3f}x {sp} {wall:>8.1f} {w_n}"
        )
    cpu_all = sum(c for c, _ in times1.values())
    whole = total_mb / cpu_all
    print(
        f"whole build: {cpu_all:.1f} CPU s = {whole:.3f} MB/s per core of raw input ({whole / base:.4f}x json.loads)"
    )
    same = [n for n in times1 if n in times_n]
    w1, wn = sum(times1[n][1] for n in same), sum(times_n[n][1] for n in same)
    print(f"wall over {'+'.join(same)}: 1 worker {w1:.1f} s, {workers} workers {wn:.1f} s ({w1 / wn:.2f}x)")
    tokens = sum(c["tokens"] for c in manifest["counts"].values())
    print(
        f"tokens {tokens:,}: {total_mb * 1e6 / tokens:.2f} raw bytes and {inputs['shards'] * 1e6 / tokens:.2f} kept bytes per token"
    )
    print("on disk, bytes per token: " + ", ".join(f"{k} {v * 1e6 / tokens:.2f}" for k, v in disk.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/data/demo.yaml")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-mb", type=float, help="cap every source at this many MB (default: the config's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_data_config(args.config)
    if args.max_mb is not None:
        for s in cfg.sources:
            s.max_mb = args.max_mb
    cfg.executor.tasks = args.tasks
    roots = resolve_sources(cfg)
    with tempfile.TemporaryDirectory(prefix="kmoe-bench-") as tmp:
        rows, base_s, total_mb = time_steps(cfg, roots, Path(tmp) / "steps")
        times1, times_n = {}, {}
        cfg.executor.workers = 1
        manifest = build(cfg, Path(tmp) / "one", stage_timer=timer(times1))
        inputs = stage_inputs(Path(tmp) / "one", total_mb)
        sp_rate, _ = sp_encode_rate(Path(tmp) / "one")
        disk = disk_mb(Path(tmp) / "one")
        cfg.executor.workers = args.workers
        cfg.tokenizer.path, cfg.tokenizer.train = str(Path(tmp) / "one" / "tokenizer"), None
        build(cfg, Path(tmp) / "many", stage_timer=timer(times_n))
    report(rows, base_s, total_mb, times1, times_n, inputs, sp_rate, args.workers, args.tasks, manifest, disk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
