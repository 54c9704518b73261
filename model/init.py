"""Deterministic initialisation from a seed alone.

Scheme (documented in docs/model.md): every tensor gets its own CPU generator seeded with
sha256(f"{seed}:{name}"), so its values depend only on the seed and its name, never on device, world
size, sharding or the order modules are built in. That is what lets an auditor rebuild the initial
weights from the recorded seed (`kmoe audit init-check`).
  - embeddings, attention q/k/v, router, expert/shared/dense gate and up: N(0, init_std)
  - output projections (attention o_proj, every down_proj): N(0, init_std / sqrt(2 * num_layers))
  - LM head: N(0, init_std); RMSNorm weights: 1; router expert bias: 0
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from .config import ModelConfig


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def init_value(name: str, shape: torch.Size, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The fp32 initial value of tensor `name` (built on CPU)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith("expert_bias"):
        return torch.zeros(shape)
    std = cfg.init_std
    if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
        std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def init_state(cfg: ModelConfig, names_shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    return {n: init_value(n, s, cfg, seed) for n, s in names_shapes.items()}


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Fill every parameter and persistent buffer of `model` in place from `seed`."""
    for name, t in persistent_tensors(model).items():
        t.copy_(init_value(name, t.shape, cfg, seed).to(t.dtype))


def persistent_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, by state-dict name (what checkpoints and digests cover)."""
    return dict(model.state_dict(keep_vars=True))
