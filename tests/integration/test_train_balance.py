"""No early expert collapse with the default router balancing: the tiny MoE of `make demo` (configs/train/tiny.yaml)
on the demo's shards with a 2-step warmup, 40 steps: no routed expert of any MoE layer goes without tokens over a
10-step window after step 10, where the aux-loss-free bias alone at DeepSeek-V3's rate (the former default) lets
experts die. The shards are `make demo-data`'s (.cache/demo/data) when it has run, else built the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmoe.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/train/tiny.yaml")


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory) -> Path:
    built = REPO / ".cache/demo/data"
    if (built / "manifest.json").is_file():
        return built
    out = tmp_path_factory.mktemp("demo") / "data"
    cmd = [
        sys.executable,
        "-m",
        "kmoe.cli",
        "data",
        "build",
        "--config",
        "configs/data/demo.yaml",
        "--out",
        str(out),
    ]
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=1800)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def windows_with_a_dead_expert(shards: Path, run: Path, *sets: str) -> list[int]:
    """Train 40 steps; the ends of the 10-step windows after step 10 in which some routed expert got no tokens."""
    base = [f"data.shards={shards}", "train.steps=40", "train.warmup_steps=2", "train.eval_every=0",
            "checkpoint.every=0", "log.wandb=false", *sets]  # fmt: skip
    args = ["train", "--config", TINY, "--run-dir", str(run)] + [a for s in base for a in ("--set", s)]
    assert main(args) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "expert_layers" in r and "event" not in r]
    assert [r["step"] for r in logged] == [10, 20, 30, 40]
    return [r["step"] for r in logged if r["step"] > 10 and r["expert_dead_frac"] > 0]


@pytest.mark.full
def test_default_balancing_keeps_every_expert_fed(demo_shards, tmp_path, capsys):
    dead = windows_with_a_dead_expert(demo_shards, tmp_path / "default")
    assert dead == []
    out = capsys.readouterr().out
    assert "10-step windows in which a routed expert got no tokens: 0 of 4" in out, out


@pytest.mark.full
def test_bias_alone_at_the_large_scale_rate_lets_experts_die(demo_shards, tmp_path):
    dead = windows_with_a_dead_expert(
        demo_shards, tmp_path / "bias-only", "model.bias_update_rate=0.001", "model.balance_loss_coeff=0"
    )
    assert dead  # what the default prevents
