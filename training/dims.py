"""Parallel dimensions: the sizes a run config asks for (pure, checked before any compute) and the
`ParallelDims` an engine exposes at run time so the trainer slices and reduces over the right groups.

Ranks are factored as world = pp x dp x cp x tp. Expert parallelism borrows its ranks from data parallelism
(as torchtitan and megatron-core do): the `ep` ranks of an expert group are data-parallel ranks that each
hold E/ep routed experts and exchange tokens by all-to-all, so `ep` divides the data-parallel size and adds
no factor to the world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kmoe.configtree import ConfigError

if TYPE_CHECKING:
    from .config import RunConfig

# parallel.* keys that split a model across ranks, and what they are called in a layout
MODEL_PARALLEL_KEYS = ("tensor_parallel", "pipeline_parallel", "context_parallel")
PARALLEL_KEYS = ("expert_parallel", *MODEL_PARALLEL_KEYS)


@dataclass(frozen=True)
class ParallelSizes:
    """How a world of ranks is split: world = pp x dp x cp x tp; ep divides dp."""

    world: int
    dp: int
    ep: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1


def parallel_sizes(cfg: RunConfig, world: int) -> ParallelSizes:
    """The sizes `cfg.parallel` asks for on `world` ranks; ConfigError naming the key when they do not fit."""
    p = cfg.parallel
    for key in PARALLEL_KEYS:
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key}: must be >= 1, got {getattr(p, key)}")
    model_par = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    if world % model_par:
        raise ConfigError(
            f"parallel: world size {world} is not divisible by tensor x pipeline x context parallel = {model_par}"
        )
    dp = world // model_par
    if dp % p.expert_parallel:
        raise ConfigError(
            f"parallel.expert_parallel: {p.expert_parallel} must divide the data-parallel size {dp} "
            f"(world {world} / model-parallel {model_par}); expert parallelism borrows data-parallel ranks"
        )
    return ParallelSizes(
        world, dp, p.expert_parallel, p.tensor_parallel, p.pipeline_parallel, p.context_parallel
    )


@dataclass(frozen=True)
class ParallelDims:
    """What the trainer needs to know of an engine's layout on this rank.

    `dp_group` is the process group over the ranks that see different data (None: the default group, or no
    process group at all). `holds_loss` is True on the ranks whose loss statistics count: the last pipeline
    stage and the first rank of its tensor/context-parallel group; summing theirs over the world gives the
    global batch's loss once.
    """

    world: int = 1
    rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Any = None
    ep: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    holds_loss: bool = True

    def sizes(self) -> ParallelSizes:
        return ParallelSizes(self.world, self.dp_size, self.ep, self.tp, self.pp, self.cp)


def data_parallel_dims(rank: int, world: int, ep: int = 1, group: Any = None) -> ParallelDims:
    """Dims of a layout where every rank is a data-parallel rank (single process, DDP, FSDP, FSDP + EP)."""
    return ParallelDims(world=world, rank=rank, dp_rank=rank, dp_size=world, dp_group=group, ep=ep)


def native_strategy(cfg: RunConfig, world: int) -> str:
    """The native engine's data-parallel wrapping: single, ddp or fsdp (`auto`: single on one rank, else
    ddp, or fsdp when experts are sharded)."""
    s, ep = cfg.parallel.strategy, cfg.parallel.expert_parallel
    if s == "auto":
        return "single" if world == 1 else ("fsdp" if ep > 1 else "ddp")
    if s == "single" and world > 1:
        raise ConfigError(f"parallel.strategy: 'single' with {world} ranks; use ddp or fsdp")
    if ep > 1 and s != "fsdp":
        raise ConfigError(
            f"parallel.strategy: {s!r} with expert_parallel {ep}; expert parallelism needs fsdp"
        )
    return s


def layout(cfg: RunConfig, world: int) -> dict[str, Any]:
    """The parallel layout as a user reads it (dry run, ledger, checkpoints); what `validate` accepted."""
    sz, t = parallel_sizes(cfg, world), cfg.train
    strategy = native_strategy(cfg, world) if cfg.engine.name == "native" else cfg.engine.name
    extra: dict[str, Any] = {}
    if cfg.engine.name == "deepspeed":
        e = cfg.engine
        strategy = f"zero{e.zero_stage}"
        extra["offload"] = {"optimizer": e.offload_optimizer, "params": e.offload_params}
    return {
        "engine": cfg.engine.name,
        "strategy": strategy,
        "world_size": world,
        "data_parallel": sz.dp,
        "expert_parallel": sz.ep,
        "tensor_parallel": sz.tp,
        "pipeline_parallel": sz.pp,
        "context_parallel": sz.cp,
        "micro_batch_size": t.micro_batch_size,
        "grad_accumulation": t.global_batch_size // (t.micro_batch_size * sz.dp),
        "global_batch_size": t.global_batch_size,
        "tokens_per_step": t.global_batch_size * cfg.data.seq_len,
        "precision": t.precision,
        "activation_checkpointing": t.activation_checkpointing,
        "compile": t.compile,
        **extra,
    }
