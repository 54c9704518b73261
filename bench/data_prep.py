"""Throughput of the data-prep pipeline: MB/s per core for each step and for the full build.

    .venv/bin/python bench/data_prep.py [--config configs/data/demo.yaml] [--workers 2] [--tokenizer DIR]

Input: the config's sources (the demo sources are fetched/cached first). Each step is timed alone in this
process (one core, CPU time, so other load on the machine does not skew it) over the documents that reach
it. The full build runs twice under LocalPipelineExecutor: with one worker (all in this process, so CPU time
gives MB/s per core for the whole pipeline) and with `--workers` processes, timed by the wall clock. Baseline, measured in the same run: parsing the same JSONL with json.loads (the floor
any pipeline pays), so every figure is also printed as a ratio to it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the byte-level test tokenizer

from byte_tokenizer import ByteTokenizer  # noqa: E402

from data_prep.config import load_data_config  # noqa: E402
from data_prep.pipeline import build, resolve_sources, text_pipeline  # noqa: E402
from data_prep.records import Doc  # noqa: E402
from data_prep.sources.files import list_units, read_unit  # noqa: E402
from data_prep.steps.base import Drop, StepCounts  # noqa: E402
from data_prep.steps.dedup import DedupStep  # noqa: E402


def mb(docs: list[Doc]) -> float:
    return sum(len(d.raw) if d.raw is not None else len(d.text.encode()) for d in docs) / 1e6


def time_steps(cfg, roots: list[str], out: Path) -> tuple[list[tuple[str, float, float]], float, float]:
    """[(step, MB in, seconds)], baseline seconds, total input MB."""
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
    steps = [s for s in text_pipeline(cfg, out, roots)[1:-1]] + [DedupStep(out, cfg.dedup)]
    rows = []
    for step in steps:
        step.setup()
        size, counts, kept = mb(docs), StepCounts(), []
        t0 = time.process_time()
        for d in docs:
            r = step.apply(d, counts)
            if not isinstance(r, Drop):
                kept.append(r)
        rows.append((step.name, size, time.process_time() - t0))
        docs = kept
    return rows, baseline, total_mb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/data/demo.yaml")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--tokenizer", help="tokenizer dir for the full build (default: the byte-level test tokenizer)"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_data_config(args.config)
    cfg.executor.workers = args.workers
    cfg.executor.tasks = max(cfg.executor.tasks, args.workers)
    roots = resolve_sources(cfg)
    with tempfile.TemporaryDirectory(prefix="kmoe-bench-") as tmp:
        rows, baseline, total_mb = time_steps(cfg, roots, Path(tmp) / "steps")
        tok = args.tokenizer or ByteTokenizer()
        # One worker: every stage runs in this process, so its CPU time is the whole pipeline's.
        cfg.executor.workers = 1
        c0, t0 = time.process_time(), time.perf_counter()
        build(cfg, Path(tmp) / "build1", tokenizer=tok)
        cpu1, wall1 = time.process_time() - c0, time.perf_counter() - t0
        cfg.executor.workers = args.workers
        t0 = time.perf_counter()
        build(cfg, Path(tmp) / "buildn", tokenizer=tok)
        wall = time.perf_counter() - t0
    base_rate = total_mb / baseline
    print(
        f"input {total_mb:.1f} MB from {len(cfg.sources)} sources; baseline json.loads {base_rate:.1f} MB/s"
    )
    print(f"{'step':<10} {'MB in':>8} {'CPU s':>8} {'MB/s/core':>10} {'vs baseline':>12}")
    for name, size, secs in rows:
        rate = size / secs if secs else float("inf")
        print(f"{name:<10} {size:>8.1f} {secs:>8.2f} {rate:>10.2f} {rate / base_rate:>11.3f}x")
    slow = min(rows, key=lambda r: r[1] / r[2] if r[2] else float("inf"))
    serial = sum(r[2] for r in rows)
    print(f"slowest step: {slow[0]} at {slow[1] / slow[2]:.2f} MB/s per core")
    print(f"text+dedup steps in one process: {total_mb / serial:.2f} MB/s per core")
    full1 = total_mb / cpu1
    full = total_mb / wall / args.workers
    tok_name = "given" if args.tokenizer else "byte"
    print(
        f"full build (read..manifest, {tok_name} tokenizer), 1 worker: {cpu1:.1f} CPU s ({wall1:.1f} s wall) = "
        f"{full1:.2f} MB/s per core ({full1 / base_rate:.3f}x baseline)"
    )
    print(
        f"full build, {args.workers} workers: {wall:.1f} s wall = {full:.2f} MB/s per core by wall clock "
        f"(includes process start-up, single-task stages and other load on the machine)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
