"""Learning-rate schedules as pure functions of the step (no optimizer, no state)."""

from __future__ import annotations

import math


def warmup_factor(step: int, warmup: int) -> float:
    """Linear warmup from lr/warmup at step 0 up to 1 at step `warmup`."""
    return 1.0 if warmup <= 0 or step >= warmup else (step + 1) / warmup


def cosine_lr(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at `total`."""
    if step < warmup:
        return lr * warmup_factor(step, warmup)
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def wsd_lr(step: int, total: int, warmup: int, lr: float, min_lr: float, decay_fraction: float) -> float:
    """Warmup-stable-decay: linear warmup, constant lr, then linear decay to min_lr over the last share."""
    if step < warmup:
        return lr * warmup_factor(step, warmup)
    decay_steps = max(1, round(total * decay_fraction))
    decay_start = total - decay_steps
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / decay_steps)
    return lr + (min_lr - lr) * progress


def lr_at(step: int, schedule: str, total: int, warmup: int, lr: float, min_lr: float,
          decay_fraction: float = 0.2) -> float:  # fmt: skip
    """The learning rate of optimizer step `step` (0-based) under the named schedule."""
    if schedule == "cosine":
        return cosine_lr(step, total, warmup, lr, min_lr)
    if schedule == "wsd":
        return wsd_lr(step, total, warmup, lr, min_lr, decay_fraction)
    if schedule == "constant":
        return lr * warmup_factor(step, warmup)
    raise ValueError(f"train.schedule: unknown schedule {schedule!r} (cosine, wsd, constant)")
