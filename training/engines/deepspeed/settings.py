"""The DeepSpeed config a kmoe run config implies, and the checks of `engine.*` for the deepspeed engine (pure).

kmoe's trainer keeps what it owns (the lr schedule, loss scaling, data, stability policy); DeepSpeed gets the
ZeRO stage, offload, precision, micro-batching and gradient clipping. Nothing here imports deepspeed. `validate_deepspeed` is the engine's own check in the capability table
(training/engines/capabilities.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kmoe.configtree import ConfigError

if TYPE_CHECKING:
    from ...config import RunConfig

ZERO_STAGES = (1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu")
# DeepSpeed's own defaults (elements), written out so the memory plan (memory.py) counts what runs.
BUCKETS = {
    "reduce_bucket_size": 500_000_000,  # gradient reduction buffer
    "allgather_bucket_size": 500_000_000,  # ZeRO-1/2 parameter all-gather buffer
    "stage3_prefetch_bucket_size": 50_000_000,  # ZeRO-3 parameters fetched ahead of their module
    "stage3_param_persistence_threshold": 100_000,  # ZeRO-3 keeps smaller parameters whole on every rank
    "stage3_max_live_parameters": 1_000_000_000,  # ZeRO-3 gathered parameters alive at once
}


def validate_deepspeed(cfg: RunConfig) -> None:
    """`engine.*` and `parallel.strategy` for `engine.name: deepspeed`; ConfigError naming the key."""
    e = cfg.engine
    if e.zero_stage not in ZERO_STAGES:
        raise ConfigError(
            f"engine.zero_stage: {e.zero_stage} is not a ZeRO stage the deepspeed engine runs (1, 2 or 3; "
            "stage 0 is plain data parallelism: use engine.name=native)"
        )
    for key in ("offload_optimizer", "offload_params"):
        if getattr(e, key) not in OFFLOAD_DEVICES:
            raise ConfigError(
                f"engine.{key}: {getattr(e, key)!r} is not supported (none or cpu; NVMe offload needs "
                "DeepSpeed's async_io op, which this build does not compile)"
            )
    if e.offload_params != "none" and e.zero_stage != 3:
        raise ConfigError(
            f"engine.offload_params: parameters are only partitioned (and offloadable) under ZeRO-3, "
            f"but engine.zero_stage is {e.zero_stage}"
        )
    if cfg.parallel.strategy != "auto":
        raise ConfigError(
            f"parallel.strategy: {cfg.parallel.strategy!r} is a native-engine setting; the deepspeed engine "
            "shards by engine.zero_stage (leave parallel.strategy at auto)"
        )
    if cfg.train.compile:
        raise ConfigError("train.compile: not implemented by the deepspeed engine (set it false)")
    if cfg.train.activation_checkpointing:
        raise ConfigError(
            "train.activation_checkpointing: not implemented by the deepspeed engine (set it false)"
        )


def grad_accumulation(cfg: RunConfig, dp_size: int) -> int:
    t = cfg.train
    return t.global_batch_size // (t.micro_batch_size * dp_size)


def ds_config(cfg: RunConfig, dp_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for this run on `dp_size` data-parallel ranks.

    The optimizer is kmoe's torch AdamW passed in by the engine (hence `zero_allow_untested_optimizer` and,
    with offload, `zero_force_ds_cpu_optimizer: false`: DeepSpeedCPUAdam would need a JIT-compiled op). No
    scheduler: the trainer sets the lr of every step. Loss scaling is the trainer's (`MicroBatch.loss_scale`),
    so the engine calls `backward(..., scale_wrt_gas=False)`.
    """
    t, e = cfg.train, cfg.engine
    zero: dict[str, Any] = {
        "stage": e.zero_stage,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        # Communication overlaps compute on CUDA streams; on CPU there are none to overlap with.
        "overlap_comm": on_gpu,
        # ZeRO-3's memory-efficient linear replaces torch.nn.functional.linear process-wide (every model, any
        # engine, until reset) with its own autograd function, whose gradients differ from aten's in the last
        # bits; kmoe keeps torch's, so ZeRO-3 takes the native engine's steps.
        "memory_efficient_linear": False,
        **BUCKETS,
    }
    if e.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if e.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    conf: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accumulation(cfg, dp_size),
        "gradient_clipping": max(t.grad_clip, 0.0),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,  # kmoe's metrics log the steps
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        # bf16 weights and activations, fp32 master weights and optimizer state in ZeRO, fp32 gradient
        # accumulation, and a non-finite gradient skips the step as the native engine does.
        conf["bf16"] = {"enabled": True, "check_grad_overflow": True}
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
    return conf
