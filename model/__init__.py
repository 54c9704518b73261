"""The kmoe model: a decoder-only MoE transformer in plain PyTorch, its init, sizes, checkpoints and HF export."""

from .config import ModelConfig, validate_model
from .init import init_weights
from .params import model_size
from .transformer import ModelOutput, MoETransformer

__all__ = ["ModelConfig", "ModelOutput", "MoETransformer", "init_weights", "model_size", "validate_model"]
