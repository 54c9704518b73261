"""Loss-spike and non-finite detection as pure functions over the recent loss history."""

from __future__ import annotations

import math

WINDOW = 20  # losses kept for the running mean
MIN_HISTORY = 5  # no spike verdict before this many good steps


def is_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def is_spike(loss: float, window: list[float], threshold: float) -> bool:
    """True when `loss` exceeds `threshold` x the mean of the recent good losses (threshold 0 disables)."""
    if threshold <= 0 or len(window) < MIN_HISTORY:
        return False
    return loss > threshold * (sum(window) / len(window))


def push(window: list[float], loss: float) -> list[float]:
    """The window after a good step (a new list; the oldest loss drops out)."""
    return (window + [loss])[-WINDOW:]
