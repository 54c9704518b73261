"""Random-init kmoe checkpoints for tests that export, compare or quantize a model."""

from pathlib import Path

import torch

from model import ModelConfig, MoETransformer, init_weights
from model.checkpoint import model_state, save_model_dir


def random_checkpoint(path: Path, cfg: ModelConfig, seed: int) -> Path:
    """Seeded init plus a non-zero router selection bias (as a trained model has), saved as a kmoe checkpoint."""
    model = MoETransformer(cfg)
    init_weights(model, cfg, seed=seed)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.expert_bias.uniform_(-0.05, 0.05)
    save_model_dir(path, model_state(model), {"model": cfg.__dict__})
    return path
