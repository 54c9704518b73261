"""RunConfig: the one typed config tree of a training run, loaded from YAML, validated before any compute."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kmoe import configtree
from kmoe.configtree import ConfigError
from kmoe.hashing import sha256_json
from model.config import ModelConfig, validate_model
from training.engines.capabilities import check_engine

from .dims import PARALLEL_KEYS, native_strategy, parallel_sizes


@dataclass
class DataConfig:
    shards: str = ""  # output directory of `kmoe data build` (holds manifest.json)
    blend: dict[str, float] = field(default_factory=dict)  # language -> weight; {} = token shares
    seq_len: int = 256
    split: str = "98,1,1"  # train/valid/test documents, as megatron's GPTDataset reads it
    tokenizer: str = ""  # tokenizer directory; default: the one recorded in the shard manifest


@dataclass
class TrainConfig:
    seed: int = 1234
    steps: int = 200
    global_batch_size: int = 16  # sequences per optimizer step, across all ranks
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    lr: float = 3e-4
    min_lr: float = 3e-5
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_every: int = 50
    eval_batches: int = 4
    spike_threshold: float = 0.0  # loss > threshold x running mean triggers spike_policy; 0 disables
    spike_policy: Literal["skip", "rollback"] = "skip"
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class ParallelConfig:
    strategy: Literal["auto", "single", "ddp", "fsdp"] = "auto"  # auto: single for 1 rank, else ddp
    tensor_parallel: int = 1
    expert_parallel: int = 1  # ranks of an expert group (borrowed from data parallelism; divides it)
    pipeline_parallel: int = 1
    context_parallel: int = 1


@dataclass
class EngineConfig:
    name: Literal["native", "megatron", "deepspeed"] = "native"
    zero_stage: int = 1  # deepspeed: 1 shards optimizer state, 2 also gradients, 3 also parameters
    offload_optimizer: Literal["none", "cpu"] = "none"  # deepspeed: optimizer state and its step on the CPU
    offload_params: Literal["none", "cpu"] = "none"  # deepspeed ZeRO-3: parameters kept on the CPU


@dataclass
class CheckpointConfig:
    every: int = 50
    keep_last: int = 3
    keep_every: int = 0  # also keep every K-th step forever; 0 disables
    async_save: bool = False  # interval checkpoints written by a background thread while training goes on


@dataclass
class LogConfig:
    every: int = 10
    wandb: bool = True
    wandb_project: str = "kmoe"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    peak_flops: float = 0.0  # per device; 0 = look up from the device name where known


@dataclass
class LaunchConfig:
    """How `kmoe launch slurm` runs the training: one torchrun per node, `procs_per_node` ranks each."""

    nodes: int = 1
    gpus_per_node: int = 8  # one rank per GPU; 0 = CPU ranks (gloo), `procs_per_node` of them
    gpu_memory_gib: float = 80.0  # per GPU (H100 80, H200 141); `kmoe train` refuses a layout that cannot fit
    procs_per_node: int = 0  # ranks per node; 0 = gpus_per_node (must be set when gpus_per_node is 0)
    cpus_per_task: int = 0  # CPUs for each node's torchrun and its ranks; 0 = the partition's default
    partition: str = ""
    account: str = ""
    time: str | int = "24:00:00"  # SLURM time limit: minutes, [days-]hours:minutes:seconds, days-hours, ...
    requeue: bool = True  # after a stop signal (time limit warning, preemption) the job requeues itself
    max_requeues: int = 20  # ... at most this many times (SLURM_RESTART_COUNT), then it exits 75
    signal_grace_s: int = 300  # USR1 this long before the time limit: to finish a step and checkpoint
    rdzv_port: int = 29500  # c10d rendezvous on the first node, at this port + (job id mod 1000)
    python: str = ""  # interpreter on the nodes; "" = the one that runs `kmoe launch`
    # shell lines run first: `module load cuda`, `source .venv/...`
    setup: list[str] = field(default_factory=list)
    env: dict[str, str | int | float] = field(default_factory=dict)  # exported: NCCL_*, OMP_NUM_THREADS
    sbatch: list[str] = field(default_factory=list)  # more `#SBATCH` options: `--qos=high`, `--exclusive`

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node or self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass
class RunConfig:
    name: str = "kmoe-run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def _resolve_includes(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """A section given as a path to a YAML file is read from that file (relative to the including file)."""
    out = dict(data)
    for key, value in data.items():
        if (
            isinstance(value, str)
            and value.endswith((".yaml", ".yml"))
            and key in RunConfig.__dataclass_fields__
        ):
            path = Path(value) if Path(value).is_absolute() else base / value
            if not path.is_file():
                raise ConfigError(f"{key}: included file not found: {path}")
            out[key] = configtree.read_yaml(path)
    return out


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config (or a bare model config) from YAML, apply `--set` overrides, validate."""
    data: dict[str, Any] = {}
    if path:
        data = configtree.read_yaml(path)
        if "model" not in data and set(data) <= set(ModelConfig.__dataclass_fields__):
            data = {"model": data}  # a file of configs/model/ alone
        data = _resolve_includes(data, Path(path).parent)
    data = configtree.apply_overrides(data, list(overrides or []))
    try:
        cfg = configtree.from_dict(RunConfig, data)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return cfg


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Every cross-field check of a run, in one place; raises ConfigError naming the key."""
    validate_model(cfg.model)
    m, t, p = cfg.model, cfg.train, cfg.parallel
    for key in ("steps", "global_batch_size", "micro_batch_size"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key}: must be positive, got {getattr(t, key)}")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise ConfigError(f"train.lr/min_lr: need 0 <= min_lr <= lr and lr > 0, got {t.lr}/{t.min_lr}")
    if not 0 <= t.warmup_steps <= t.steps:
        raise ConfigError(f"train.warmup_steps: {t.warmup_steps} is outside 0..train.steps ({t.steps})")
    if not 0 < t.decay_fraction <= 1:
        raise ConfigError(f"train.decay_fraction: must be in (0, 1], got {t.decay_fraction}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size {t.micro_batch_size}"
        )
    if cfg.data.seq_len <= 0 or cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len: {cfg.data.seq_len} must be in 1..model.max_seq_len ({m.max_seq_len})"
        )
    for lang, w in cfg.data.blend.items():
        if w < 0:
            raise ConfigError(f"data.blend.{lang}: weight must be >= 0, got {w}")
    for key in PARALLEL_KEYS:
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key}: must be >= 1, got {getattr(p, key)}")
    if m.num_experts % p.expert_parallel:
        raise ConfigError(
            f"parallel.expert_parallel: model.num_experts {m.num_experts} is not divisible by "
            f"expert_parallel {p.expert_parallel}"
        )
    if m.num_heads % p.tensor_parallel or m.num_kv_heads % p.tensor_parallel:
        raise ConfigError(
            f"parallel.tensor_parallel: {p.tensor_parallel} must divide model.num_heads ({m.num_heads}) "
            f"and model.num_kv_heads ({m.num_kv_heads})"
        )
    if m.num_layers % p.pipeline_parallel:
        raise ConfigError(
            f"parallel.pipeline_parallel: {p.pipeline_parallel} does not divide model.num_layers {m.num_layers}"
        )
    check_engine(cfg, world_size)  # what the engine implements: training/engines/capabilities.py
    if world_size is not None:
        dp = parallel_sizes(cfg, world_size).dp
        if cfg.engine.name == "native":
            native_strategy(cfg, world_size)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size: {t.global_batch_size} is not divisible by micro_batch_size x "
                f"data-parallel size ({t.micro_batch_size} x {dp})"
            )
    if world_size is not None and cfg.engine.name == "native" and cfg.launch.gpus_per_node:
        from .memory_plan import check_fits

        check_fits(cfg, world_size)  # a layout that cannot fit its GPUs is refused before any compute
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")
    if cfg.log.every <= 0:
        raise ConfigError(f"log.every: must be positive, got {cfg.log.every}")
    _validate_launch(cfg)


def slurm_time_seconds(text: str) -> int:
    """A SLURM time limit in seconds: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S` (as sbatch --time)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a SLURM time (e.g. 90, 04:00:00, 2-00:00:00)")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        return ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return (a * 60 + b) * 60 + c
    return a * 60 + (b or 0)  # M[:S]


def _validate_launch(cfg: RunConfig) -> None:
    """`launch.*`: what `kmoe launch slurm` would otherwise learn from sbatch or a failed job."""
    la = cfg.launch
    for key in ("gpus_per_node", "procs_per_node", "cpus_per_task", "max_requeues"):
        if getattr(la, key) < 0:
            raise ConfigError(f"launch.{key}: must be >= 0, got {getattr(la, key)}")
    if la.nodes < 1:
        raise ConfigError(f"launch.nodes: must be >= 1, got {la.nodes}")
    if la.gpus_per_node and la.gpu_memory_gib <= 0:
        raise ConfigError(f"launch.gpu_memory_gib: must be positive with GPUs, got {la.gpu_memory_gib}")
    if la.gpus_per_node == 0 and la.procs_per_node == 0:
        raise ConfigError("launch.procs_per_node: set the CPU ranks per node when launch.gpus_per_node is 0")
    if la.gpus_per_node and la.procs_per_node not in (0, la.gpus_per_node):
        raise ConfigError(
            f"launch.procs_per_node: {la.procs_per_node} ranks on {la.gpus_per_node} GPUs per node; "
            "one rank per GPU (leave it 0)"
        )
    if la.gpus_per_node == 0 and cfg.train.precision == "bf16":
        raise ConfigError(
            "train.precision: bf16 needs GPUs but launch.gpus_per_node is 0 (CPU ranks train fp32)"
        )
    try:
        limit = slurm_time_seconds(str(la.time))
    except ValueError as e:
        raise ConfigError(f"launch.time: {e}") from None
    if limit <= 0:
        raise ConfigError(f"launch.time: {la.time!r} is no time at all")
    if not 0 < la.signal_grace_s < min(limit, 65536):
        raise ConfigError(
            f"launch.signal_grace_s: {la.signal_grace_s} must be in 1..{min(limit, 65536) - 1} "
            f"(below launch.time {la.time}; SLURM allows up to 65535)"
        )
    if not 1024 <= la.rdzv_port <= 65535 - 999:
        raise ConfigError(f"launch.rdzv_port: {la.rdzv_port} is outside 1024..64536")
    for name in la.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"launch.env.{name}: not a shell variable name")


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    return configtree.to_dict(cfg)


def config_hash(cfg: RunConfig) -> str:
    """sha256 of the canonical JSON of the resolved config (what the ledger records)."""
    return sha256_json(config_dict(cfg))
