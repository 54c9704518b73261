"""LR schedules and spike detection are pure functions of the step / loss history."""

import math

import pytest

from training import stability
from training.schedule import cosine_lr, lr_at, wsd_lr


def test_cosine_warmup_peak_and_floor():
    lrs = [cosine_lr(s, 100, 10, 1e-3, 1e-4) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert lrs[100] == pytest.approx(1e-4)
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: the cosine midpoint


def test_wsd_stable_then_linear_decay():
    lrs = [wsd_lr(s, 100, 10, 1e-3, 0.0, 0.2) for s in range(101)]
    assert all(lr == pytest.approx(1e-3) for lr in lrs[10:80])
    assert lrs[90] == pytest.approx(5e-4) and lrs[100] == pytest.approx(0.0)


def test_unknown_schedule_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="train.schedule"):
        lr_at(0, "linear", 10, 0, 1.0, 0.0)
    assert lr_at(50, "constant", 100, 10, 2.0, 0.0) == 2.0


def test_spike_needs_history_and_threshold():
    window = [2.0] * 5
    assert stability.is_spike(4.1, window, 2.0)
    assert not stability.is_spike(3.9, window, 2.0)
    assert not stability.is_spike(100.0, window[:4], 2.0)  # too little history
    assert not stability.is_spike(100.0, window, 0.0)  # disabled
    assert stability.push(list(range(stability.WINDOW)), 99.0)[-1] == 99.0
    assert len(stability.push(list(range(stability.WINDOW)), 99.0)) == stability.WINDOW
    assert not stability.is_finite(1.0, math.nan) and stability.is_finite(1.0, 2.0)
