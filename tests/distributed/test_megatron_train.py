"""The tiny model trained by the trainer under megatron-core on 2 gloo ranks (EP=2, TP=2 with sequence
parallelism, PP=2) takes the single-process native run's steps: losses within 1e-4 relative for 20 steps on
the same batches (TP: 5e-4, below), and the aux-loss-free router bias moves and lands where the native run's
does (bit for bit under EP and PP; under TP up to step 10, then a few entries a couple of updates off).

Why TP gets more room: both engines clip by a global gradient norm summed in fp32, and torch's CPU fp32 norm of
a 2M-element tensor is off by about 3e-5 relative (measured: the native engine's step-1 norm 5.044475 against
5.044627 in fp64). TP halves the tensors, so megatron's error differs (5.044544), the clip coefficients differ
by ~1e-5 from step 1 on, and the runs drift apart: 3.1e-4 by step 20 (EP=2 and PP=2 hash the same tensor
shapes as the native run and stay within 1e-4; plain FSDP over 4 ranks drifts to 1.9e-4 by step 12, issue 14).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from megatron_cpu import install
from multirank import rank_info, run_distributed_test

from model.checkpoint import load_model_dir

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/train/tiny.yaml")
STEPS = 20
TOL = {"expert_parallel": 1e-4, "tensor_parallel": 5e-4, "pipeline_parallel": 1e-4}


def overrides(shards: str, *more: str) -> list[str]:
    return [f"data.shards={shards}", f"train.steps={STEPS}", "train.warmup_steps=2", "train.eval_every=0",
            "checkpoint.every=5", "checkpoint.keep_last=10", "checkpoint.keep_every=0", "log.wandb=false",
            # the router rates the tolerances below were measured under (bias step 0.001, no balance loss,
            # which megatron refuses): today's bias step 0.01 turns each rounding-flipped route into a 10x
            # larger bias change, so every multi-rank layout leaves the native run sooner
            "model.balance_loss_coeff=0", "model.bias_update_rate=0.001", *more]  # fmt: skip


def train(run_dir: str, over: list[str], resume: str = "none") -> int:
    """One Trainer run on this rank (in-process for one rank, or inside run_distributed_test)."""
    import torch.distributed as dist

    from training.config import load_run_config
    from training.parallel import DistInfo
    from training.trainer import Trainer

    info = rank_info() if dist.is_initialized() else DistInfo(0, 1, 0, torch.device("cpu"))
    return Trainer(load_run_config(TINY, over), Path(run_dir), info).run(resume)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}


def router_bias(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    _, state = load_model_dir(run_dir / "checkpoints" / f"step-{step:08d}")
    return {k: v for k, v in state.items() if k.endswith("expert_bias")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from toy_shards import write_toy_shards

    return str(write_toy_shards(tmp_path_factory.mktemp("toy"), n_docs=150))


@pytest.fixture(scope="module")
def native(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("native")
    assert train(str(run), overrides(shards)) == 0
    return run


@pytest.mark.full
@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["expert_parallel", "tensor_parallel", "pipeline_parallel"])
def test_two_rank_megatron_takes_the_native_steps(shards, native, tmp_path, layout):
    over = overrides(shards, "engine.name=megatron", f"parallel.{layout}=2")
    assert run_distributed_test(train, 2, args=(str(tmp_path), over), setup=install) == [0, 0]
    ref, got = losses(native), losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(ref)
    worst = max(abs(got[s] - ref[s]) / ref[s] for s in ref)
    assert worst <= TOL[layout], {s: (got[s], ref[s]) for s in ref}
    rate = 1e-3  # the bias_update_rate overrides() pins
    for step in (5, STEPS):
        mine, theirs = router_bias(tmp_path, step), router_bias(native, step)
        assert set(mine) == set(theirs) and all(v.abs().max() > 0 for v in mine.values())
        diff = torch.cat([(mine[k] - theirs[k]).abs().flatten() for k in sorted(mine)])
        if layout != "tensor_parallel" or step == 5:
            assert diff.max() <= 1e-6, f"step {step}: router bias differs from native by {diff.max()}"
        else:  # the TP drift above flips a few routes late in the run: measured 3 of 24 entries, 2 steps off
            assert diff.max() <= 4 * rate + 1e-6 and (diff > 1e-6).float().mean() <= 0.25, diff
