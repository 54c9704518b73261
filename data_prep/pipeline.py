"""`kmoe data build`: the stages as datatrove pipelines, run by LocalPipelineExecutor or SlurmPipelineExecutor.

  text      (executor.tasks tasks)  read -> decode -> normalize -> langid -> quality -> pii -> work/text/<rank>
  dedup-*   (executor.tasks tasks)  signatures -> exact (by hash prefix) -> LSH buckets (band ranges) ->
            clusters (1 task) -> dedup filter -> corpus/kept/<lang>/<rank>-<part>  (data_prep/steps/dedup_dist.py)
  tokenizer (1 task, if training)   train_tokenizer(OUT/corpus, ...) -> OUT/tokenizer
  shards    (executor.tasks tasks)  task r: part r of every language, mix budget + tokenize ->
                                    shards/<lang>-<r>.bin/.idx (a budgeted language: one part, task 0)
  finalize  (1 task)                stats.json (accounting checked) + manifest.json
Each stage's completion markers live under OUT/work/logs/<stage>/completions, so a relaunch skips finished
tasks. A relaunch with a different config into the same OUT is refused (stale outputs would be mixed in).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from data_prep import accounting, tokenizer_io
from data_prep.config import LANGS, DataConfig
from data_prep.manifest import build_manifest
from data_prep.parts import language_totals
from data_prep.records import write_json
from data_prep.shards import ShardStep
from data_prep.sources.demo import fetch
from data_prep.sources.files import preflight
from data_prep.sources.reader import ReadStep
from data_prep.stages import KeptWriter, Stage1Writer, TextPartReader
from data_prep.steps.base import DocStep
from data_prep.steps.decode import DecodeStep
from data_prep.steps.dedup import DedupFilter
from data_prep.steps.dedup_dist import ClusterTask, DedupSignatures, ExactDedupTask, LshBucketTask
from data_prep.steps.langid import LangIdStep
from data_prep.steps.normalize import NormalizeStep
from data_prep.steps.pii import PiiStep
from data_prep.steps.quality import QualityStep
from data_prep.tasklog import KmoeSlurmExecutor, QuietLocalExecutor, quiet_console, run_stage
from kmoe.configtree import ConfigError, to_dict
from kmoe.hashing import sha256_json

log = logging.getLogger(__name__)


def config_hash(cfg: DataConfig) -> str:
    """Hash of what determines the outputs (executor settings that only change speed are left out)."""
    d = to_dict(cfg)
    d["executor"] = {"tasks": cfg.executor.tasks}  # task count names the removed/<step>/<rank> files
    return sha256_json(d)


def resolve_sources(cfg: DataConfig) -> list[str]:
    """Input roots per source; demo sources are fetched (or found in the cache) first."""
    return [
        str(fetch(s.path, cfg.cache_dir, s.max_mb)) if s.type == "demo" else str(Path(s.path).resolve())
        for s in cfg.sources
    ]


def text_pipeline(cfg: DataConfig, out: Path, roots: list[str]) -> list[PipelineStep]:
    fields = {s.name: s.text_field for s in cfg.sources}
    steps = [
        ReadStep(out, cfg.sources, roots, cfg.pii),
        DecodeStep(out, cfg.decode, fields),
        NormalizeStep(out, cfg.normalize),
        LangIdStep(out, cfg.langid),
        QualityStep(out, cfg.quality),
        PiiStep(out, cfg.pii),
        Stage1Writer(out),
    ]
    return _redacting(cfg, steps)


def _redacting(cfg: DataConfig, steps: list[PipelineStep]) -> list[PipelineStep]:
    """Every step that writes removed documents redacts them with the build's `pii:` settings."""
    for step in steps:
        if isinstance(step, DocStep):
            step.redact_with = cfg.pii
    return steps


class TrainTokenizerStep(PipelineStep):
    type = "kmoe"
    name = "tokenizer"

    def __init__(self, out_dir, train_cfg: dict):
        super().__init__()
        self.out_dir, self.train_cfg = str(out_dir), train_cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        tokenizer_io.train(Path(self.out_dir), self.train_cfg)
        return iter(())


class FinalizeStep(PipelineStep):
    type = "kmoe"
    name = "finalize"

    def __init__(self, out_dir, cfg: DataConfig, tokenizer):
        super().__init__()
        self.out_dir, self.cfg, self.tokenizer = str(out_dir), cfg, tokenizer

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        finalize(Path(self.out_dir), self.cfg, self.tokenizer)
        return iter(())


def finalize(out: Path, cfg: DataConfig, tokenizer) -> dict:
    stats = accounting.merge_stats(out)
    accounting.check(stats)
    write_json(out / "stats.json", stats)
    totals = language_totals(
        {p.stem: json.loads(p.read_text()) for p in sorted((out / "work" / "shard_totals").glob("*.json"))}
    )
    if isinstance(tokenizer, str | Path):
        info = tokenizer_io.describe(
            tokenizer_io.open_tokenizer(tokenizer), _rel_or_abs(Path(tokenizer), out)
        )
    else:
        info = tokenizer_io.describe(tokenizer, "in-process")
    manifest = build_manifest(out, totals, info, config_hash(cfg), cfg.mix.weights)
    write_json(out / "manifest.json", manifest)
    return manifest


def _rel_or_abs(p: Path, out: Path) -> str:
    try:
        return str(p.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(p.resolve())


def stages(cfg: DataConfig, out: Path, roots: list[str], tokenizer) -> list[tuple[str, list, int, int]]:
    """(name, pipeline, tasks, workers) in order. `tokenizer`: a directory or an in-process object."""
    tok_arg = tokenizer
    result = [("text", text_pipeline(cfg, out, roots), cfg.executor.tasks, cfg.executor.workers)]
    result += dedup_stages(cfg, out)
    if tokenizer is None:
        result.append(("tokenizer", [TrainTokenizerStep(out, cfg.tokenizer.train)], 1, 1))
        tok_arg = str(out / "tokenizer")
    # An in-process tokenizer object cannot be sent to worker processes: run the shard tasks in this one.
    shard_workers = cfg.executor.workers if isinstance(tok_arg, str) else 1
    shards = [ShardStep(out, list(LANGS), tok_arg, cfg.mix.max_tokens, cfg.pii)]
    result.append(("shards", shards, cfg.executor.tasks, shard_workers))
    result.append(("finalize", [FinalizeStep(out, cfg, tok_arg)], 1, 1))
    return result


def dedup_stages(cfg: DataConfig, out: Path) -> list[tuple[str, list, int, int]]:
    """The dedup stages: every one but the clustering runs as parallel tasks; the text tasks' split is kept
    (signature and filter task t read text task t), the exact and bucket tasks split hash prefixes and bands."""
    d, tasks, workers = cfg.dedup, cfg.executor.tasks, cfg.executor.workers
    result = [("dedup-signatures", [TextPartReader(out), DedupSignatures(out, d, tasks)], tasks, workers)]
    if d.exact:
        result.append(("dedup-exact", [ExactDedupTask(out, d, tasks)], tasks, workers))
    if d.near:
        result.append(("dedup-buckets", [LshBucketTask(out, d, tasks)], min(tasks, d.bands), workers))
    result.append(("dedup-clusters", [ClusterTask(out, d, tasks)], 1, 1))
    keep = [TextPartReader(out), DedupFilter(out), KeptWriter(out, cfg.shard_docs)]
    result.append(("dedup", _redacting(cfg, keep), tasks, workers))
    return result


def _guard_out(out: Path, chash: str) -> None:
    marker = out / "work" / "config_hash"
    if marker.is_file() and marker.read_text().strip() != chash:
        raise ConfigError(
            f"{out} holds a build of a different config (work/config_hash); use a new --out or delete {out}"
        )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(chash + "\n")


def build(cfg: DataConfig, out: str | Path, tokenizer=None, stage_timer=None) -> dict:
    """Run every stage; returns the manifest. `tokenizer` overrides the config's (an object or a directory);
    `stage_timer(name)`, a context manager around each local stage (bench/data_prep.py times stages with it).
    Under SLURM it submits the chain and returns {"slurm_jobs": {stage: job id, -1 where every task is done}}."""
    out = Path(out)
    quiet_console()
    if tokenizer is None and cfg.tokenizer.path:
        tokenizer = cfg.tokenizer.path
    if tokenizer is None and cfg.tokenizer.train is None:
        raise ConfigError("tokenizer: set tokenizer.path (an existing tokenizer) or tokenizer.train")
    if tokenizer is None:
        tokenizer_io.check_train_config(cfg.tokenizer.train)  # a bad key fails now, not after the text stages
    _guard_out(out, config_hash(cfg))
    roots = resolve_sources(cfg)
    preflight(cfg.sources, [Path(r) for r in roots])
    plan = stages(cfg, out, roots, tokenizer)
    executors = []
    for name, pipeline, tasks, workers in plan:
        executors.append(
            _executor(cfg, out, name, pipeline, tasks, workers, executors[-1] if executors else None)
        )
    if cfg.executor.kind == "slurm":
        executors[-1].run()  # sbatch the chain; each stage depends on the previous one
        return {"slurm_jobs": {name: ex.job_id for (name, *_), ex in zip(plan, executors)}}
    for (name, *_), ex in zip(plan, executors):
        with stage_timer(name) if stage_timer else contextlib.nullcontext():
            run_stage(name, ex, out / "work" / "logs" / name)
    return json.loads((out / "manifest.json").read_text())


def _executor(cfg: DataConfig, out: Path, name: str, pipeline, tasks: int, workers: int, depends):
    logs = str(out / "work" / "logs" / name)
    if cfg.executor.kind == "local":
        return QuietLocalExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=logs)
    s = cfg.executor.slurm
    return KmoeSlurmExecutor(
        pipeline, tasks=tasks, workers=workers, time=s.time, partition=s.partition, cpus_per_task=s.cpus_per_task,
        mem_per_cpu_gb=s.mem_per_cpu_gb, venv_path=s.venv_path, job_name=f"kmoe-data-{name}", logging_dir=logs,
        depends=depends,
    )  # fmt: skip
