"""AdamW with decoupled weight decay on matrices only, gradient clipping; the lr comes from schedule.py."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay >=2-D weights (matmuls, embeddings, experts); never norms or biases.

    The router's selection bias is a buffer, not a parameter, so the optimizer never sees it.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if _ndim(p) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def _ndim(p: torch.Tensor) -> int:
    # A ZeRO-3 partitioned parameter is an empty placeholder; DeepSpeed keeps its real shape in `ds_shape`.
    return len(getattr(p, "ds_shape", p.shape))


def no_decay_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and _ndim(p) < 2]


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    # foreach=False: the same per-tensor kernels on every layout, so DDP/FSDP/single agree closely.
    return torch.optim.AdamW(
        param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=False
    )


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def grad_norm(params: list[torch.Tensor]) -> float:
    """Global L2 norm of the gradients. Sharded (DTensor) gradients are reduced over their mesh, one norm per
    mesh (expert-parallel experts live on another mesh than the rest), combined on the host."""
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    norms = []
    for grads in by_mesh.values():
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=False)
        norms.append(float(total.full_tensor() if hasattr(total, "full_tensor") else total))
    if len(norms) <= 1:
        return norms[0] if norms else 0.0
    return math.sqrt(sum(n * n for n in norms))


def clip_(params: list[torch.Tensor], max_norm: float, norm: float) -> None:
    """Scale gradients so their global norm is at most `max_norm` (no-op for max_norm <= 0)."""
    if max_norm <= 0 or not math.isfinite(norm) or norm <= max_norm:
        return
    coef = max_norm / (norm + 1e-6)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)
