"""Replay's per-step judgement and verdicts, without a model: relative deviations, the step tolerance, `--exact`,
and what `kmoe audit replay` prints for bit for bit, within tolerance and failed (integration tests run the real
trainer: tests/integration/test_audit_replay_threads.py)."""

import math

import torch

from kmoe.cmd_audit import replay_verdict
from kmoe.hashing import tensor_digest
from training.audit.replay import ReplayResult, _replay_step, deviation

BATCH = torch.arange(6, dtype=torch.int32).view(2, 3)


class Recomputes:
    """A replay engine whose step returns the recorded values scaled by (1 + rel)."""

    def __init__(self, rel: float):
        self.rel = rel

    def batch(self, samples):
        return BATCH

    def step(self, batch):
        return {"loss": 2.5 * (1 + self.rel), "grad_norm": 0.75 * (1 + self.rel)}


def record(step: int) -> dict:
    return {"step": step, "seq": step + 3, "loss": 2.5, "grad_norm": 0.75, "samples": {"start": 0, "count": 2},
            "batch_hash": tensor_digest(BATCH)}  # fmt: skip


def test_deviation_is_relative_and_exact_for_non_finite_values():
    assert deviation(2.0, 2.0) == 0.0 and math.isclose(deviation(2.0, 2.002), 1e-3)
    assert deviation("nan", float("nan")) == 0.0 and deviation("inf", float("inf")) == 0.0
    assert deviation("nan", 1.0) == math.inf and deviation(1.0, float("nan")) == math.inf
    assert deviation(None, 1.0) == math.inf


def test_float_noise_passes_and_a_changed_step_fails_at_its_step():
    res = ReplayResult(5, 7, "checkpoints/step-00000007")
    _replay_step(res, Recomputes(1e-7), record(6))
    assert res.ok and 0 < res.max_deviation["loss"] < 1e-6
    _replay_step(res, Recomputes(5e-3), record(7))
    assert not res.ok and res.first_divergence == 7
    assert (
        res.divergences[0].startswith("step 7 (seq 10): loss ")
        and "relative deviation 5.0e-03" in res.divergences[0]
    )


def test_exact_fails_on_any_bit():
    res = ReplayResult(5, 6, "c", step_tolerance=0.0)
    _replay_step(res, Recomputes(1e-12), record(6))
    assert not res.ok and res.first_divergence == 6


def test_verdicts():
    res = ReplayResult(5, 6, "c", bitwise=True, max_deviation={"loss": 0.0, "grad_norm": 0.0})
    assert replay_verdict(res).startswith("replay: OK, bit for bit")
    res = ReplayResult(5, 6, "c", relative_distance=2e-7, max_deviation={"loss": 5e-8, "grad_norm": 8e-8},
                       environment_differs=["threads 1 recorded, 2 here"])  # fmt: skip
    assert replay_verdict(res) == (
        "replay: OK within tolerance, not bit for bit (the environment differs as listed): largest relative "
        "step deviation loss 5.0e-08, grad_norm 8.0e-08 (<= 0.001); weights' relative distance 2.0e-07 (<= 0.001)"
    )
    res.environment_differs = []
    assert "the recorded environment was reproduced: something the genesis does not record" in replay_verdict(
        res
    )
    res.divergences, res.first_divergence = ["step 6: loss"], 6
    assert replay_verdict(res) == "replay: FAILED, first diverging step 6"
