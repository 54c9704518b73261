"""The deepspeed engine: kmoe's model under DeepSpeed ZeRO 1/2/3 with optional CPU offload (engine.py)."""

from .engine import DeepSpeedEngine

__all__ = ["DeepSpeedEngine"]
