"""Training engines: one interface (base.py), the native PyTorch engine (native.py), megatron-core (megatron/),
DeepSpeed ZeRO (deepspeed/)."""

from ..dims import ParallelDims
from .base import Engine, LossStats, MicroBatch, StepResult

__all__ = ["Engine", "LossStats", "MicroBatch", "ParallelDims", "StepResult", "build_engine"]


def build_engine(cfg, dist) -> Engine:
    """The engine named by `engine.name` (megatron/deepspeed engines plug in here)."""
    if cfg.engine.name == "native":
        from .native import NativeEngine

        return NativeEngine(cfg, dist)
    if cfg.engine.name == "megatron":
        from .megatron.engine import MegatronEngine

        return MegatronEngine(cfg, dist)
    if cfg.engine.name == "deepspeed":
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, dist)
    raise ValueError(
        f"engine.name: {cfg.engine.name!r} is not implemented (available: native, megatron, deepspeed)"
    )
