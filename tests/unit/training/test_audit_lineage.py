"""Lineage statistics on synthetic weights: matching, the two Spearman tests, norms (no model)."""

from __future__ import annotations

import numpy as np
import torch

from training.audit.lineage import decouple, match, mlp_statistic, norm_correlation


def mlp(rng: np.random.Generator, f: int = 128, d: int = 64) -> dict[str, np.ndarray]:
    return {"gate": rng.standard_normal((f, d)), "up": rng.standard_normal((f, d))}


def test_match_recovers_a_permutation_of_noisy_rows():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 32))
    perm = rng.permutation(64)
    b = np.empty_like(a)
    b[perm] = a + 0.3 * rng.standard_normal(a.shape)
    found, cos = match(a, b)
    assert (found == perm).all() and cos > 0.9


def test_permuted_copy_is_caught_by_the_robust_test_only():
    rng = np.random.default_rng(1)
    a = mlp(rng)
    u = rng.permutation(128)
    b = {k: v[u] + 0.5 * rng.standard_normal(v.shape) for k, v in a.items()}
    s = mlp_statistic(a, b)
    assert s["rho"] > 0.99 and s["p"] < 1e-50 and s["same_matching"] > 0.95
    assert abs(s["rho_identity"]) < 0.3 and s["p_identity"] > 1e-3


def test_independent_mlps_give_no_signal():
    rng = np.random.default_rng(2)
    ps = [mlp_statistic(mlp(rng), mlp(rng)) for _ in range(5)]
    assert all(s["p"] > 1e-3 and s["p_identity"] > 1e-3 for s in ps)
    assert abs(np.mean([s["rho"] for s in ps])) < 0.1


def test_decouple_removes_the_up_direction():
    rng = np.random.default_rng(3)
    up = rng.standard_normal((8, 16))
    gate = 2 * up + rng.standard_normal((8, 16))
    assert np.abs((decouple(gate, up) * up).sum(1)).max() < 1e-9


def test_norm_correlation_raw_is_high_for_unrelated_norms():
    g = torch.Generator().manual_seed(0)
    a = {f"l{i}.norm.weight": 1 + 0.05 * torch.randn(64, generator=g) for i in range(3)}
    b = {f"l{i}.norm.weight": 1 + 0.05 * torch.randn(64, generator=g) for i in range(3)}
    res = norm_correlation(a, b)
    assert res["raw_cosine"] > 0.99 and abs(res["centred_correlation"]) < 0.2 and "proves" in res["note"]
    drift = {k: v + 0.1 * i for i, (k, v) in enumerate(a.items())}  # each tensor drifts by its own offset
    drift_b = {k: v + 0.1 * i for i, (k, v) in enumerate(b.items())}
    res = norm_correlation(drift, drift_b)
    assert res["global_centred_correlation"] > 0.6 and abs(res["centred_correlation"]) < 0.2
    ones = {k: torch.ones(64) for k in a}
    assert norm_correlation(ones, ones)["centred_correlation"] is None
