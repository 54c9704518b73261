"""`kmoe train --set engine.name=megatron` from the real CLI (the megatron CPU redirect loaded at interpreter
start through tests/megatron_site), then the auditor's tools on its ledger and `kmoe export hf` of its final
checkpoint into stock transformers; and a megatron checkpoint continued by the native engine and the reverse.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/train/tiny.yaml")
SITE = str(REPO / "tests" / "megatron_site")


def kmoe(*args: str, megatron: bool = True) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([SITE, str(REPO)] if megatron else [str(REPO)]),
    )
    cmd = [sys.executable, "-m", "kmoe.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-3000:]}{proc.stderr[-5000:]}"
    return proc


def settings(shards: str, steps: int, *more: str) -> list[str]:
    over = [f"data.shards={shards}", f"train.steps={steps}", "train.warmup_steps=2", "train.eval_every=5",
            "checkpoint.every=5", "checkpoint.keep_last=10", "log.wandb=false",
            "model.balance_loss_coeff=0", *more]  # fmt: skip
    return [a for o in over for a in ("--set", o)]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from toy_shards import write_toy_shards

    return str(write_toy_shards(tmp_path_factory.mktemp("toy"), n_docs=150))


@pytest.fixture(scope="module")
def megatron_run(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("megatron-run")
    kmoe("train", "--config", TINY, "--run-dir", str(run), *settings(shards, 10, "engine.name=megatron"))
    return run


@pytest.mark.full
def test_cli_run_passes_the_audit_tools(megatron_run):
    assert losses(megatron_run)[10] < losses(megatron_run)[1]
    kmoe("audit", "verify", str(megatron_run))
    kmoe("audit", "init-check", str(megatron_run), megatron=False)  # rebuilt from config + seed alone
    out = kmoe("audit", "replay", str(megatron_run), "--from-step", "5", "--steps", "5").stdout
    assert "replay: OK, bit for bit" in out, out  # one rank, CPU, fp32: the recorded layout replays exactly


@pytest.mark.full
def test_final_checkpoint_exports_and_loads_in_stock_transformers(megatron_run, tmp_path):
    from model.hf_check import compare_logits

    ckpt = megatron_run / "checkpoints" / "step-00000010"
    kmoe(
        "export",
        "hf",
        str(ckpt),
        str(tmp_path / "hf"),
        "--dtype",
        "float32",
        "--no-tokenizer",
        megatron=False,
    )
    assert compare_logits(ckpt, tmp_path / "hf", batch=2, seq=32) <= 1e-4


@pytest.mark.full
@pytest.mark.parametrize("first, then", [("megatron", "native"), ("native", "megatron")])
def test_a_checkpoint_continues_under_the_other_engine(shards, tmp_path, first, then):
    """10 steps under one engine; steps 6-10 again under the other from its step-5 checkpoint: the same
    losses within the engines' tolerance (same batches: the checkpoint carries the data position)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    kmoe("train", "--config", TINY, "--run-dir", str(whole), *settings(shards, 10, f"engine.name={first}"))
    kmoe("train", "--config", TINY, "--run-dir", str(split), "--resume", str(whole / "checkpoints" / "step-00000005"),
         *settings(shards, 10, f"engine.name={then}"))  # fmt: skip
    ref, got = losses(whole), losses(split)
    assert sorted(got) == list(range(6, 11))
    assert max(abs(got[s] - ref[s]) / ref[s] for s in got) <= 1e-4, (got, ref)
