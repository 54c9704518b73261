"""2-rank gloo runs under torchrun: DDP and FSDP2 train the toy MoE with the single-process losses
(same global batch) to ~1e-5, and an FSDP2 checkpoint resumes on one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_shards import write_toy_shards

from training.config import load_run_config
from training.parallel import DistInfo
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/train/toy.yaml")
STEPS = 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_toy_shards(tmp_path_factory.mktemp("toy"), n_docs=120)


def overrides(shards: Path, strategy: str) -> list[str]:
    return [f"data.shards={shards}", f"train.steps={STEPS}", "checkpoint.every=5", "train.eval_every=5",
            f"parallel.strategy={strategy}"]  # fmt: skip


def torchrun(shards: Path, run_dir: Path, strategy: str, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "kmoe.cli",
           "train", "--config", CONFIG, "--run-dir", str(run_dir), *args]  # fmt: skip
    cmd += [a for o in overrides(shards, strategy) for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def single(shards: Path, run_dir: Path, resume: str = "none") -> None:
    cfg = load_run_config(CONFIG, overrides(shards, "single"))
    assert Trainer(cfg, run_dir, DistInfo(0, 1, 0, torch.device("cpu"))).run(resume) == 0


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r and "event" not in r}


def evals(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r["results"] for r in rows(run_dir) if r.get("event") == "eval"}


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single")
    single(shards, run)
    return run


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_single_process(shards, reference, tmp_path, strategy):
    run = tmp_path / strategy
    torchrun(shards, run, strategy)
    start = next(r for r in rows(run) if r.get("event") == "start")
    assert (start["layout"]["strategy"], start["layout"]["world_size"]) == (strategy, 2)
    ref, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5, rel=1e-5), step
    assert ref[STEPS] < ref[1] - 0.3  # and it is learning
    for step, res in evals(reference).items():
        for lang, r in res.items():
            assert evals(run)[step][lang]["loss"] == pytest.approx(r["loss"], abs=1e-5)
    if strategy == "fsdp":
        # The FSDP2 checkpoint (each rank its shards, kmoe names) resumes resharded on one process and
        # continues the same run.
        resumed = tmp_path / "resumed-single"
        resumed.mkdir()
        single(shards, resumed, resume=str(run / "checkpoints/step-00000005"))
        after = losses(resumed)
        assert sorted(after) == list(range(6, STEPS + 1))
        for step in after:
            assert after[step] == pytest.approx(got[step], abs=1e-5, rel=1e-5), step
        verify_names_a_missing_shard(run, tmp_path / "tampered")


def verify_names_a_missing_shard(run, copy) -> None:
    """`kmoe audit verify` checks the shard files of both ranks without loading the model."""
    import shutil

    from training.audit.verify import verify_run

    assert verify_run(run).ok
    shutil.copytree(run, copy)
    (copy / "checkpoints/step-00000010/model/shard-00001.safetensors").unlink()
    found = "\n".join(verify_run(copy).findings)
    assert "model/shard-00001.safetensors is recorded but missing" in found and "is held by no shard" in found


def test_signal_to_one_rank_stops_both_at_the_same_step(shards, tmp_path):
    import signal
    import time

    import psutil

    run = tmp_path / "signalled"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "kmoe.cli",
           "train", "--config", CONFIG, "--run-dir", str(run)]  # fmt: skip
    cmd += [
        a for o in [f"data.shards={shards}", "train.steps=200", "checkpoint.every=0"] for a in ("--set", o)
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.is_file() and '"step": 3,' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    rank1 = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGUSR1)  # only rank 1 is told
    out = proc.communicate(timeout=180)[0]
    marker = json.loads((run / "requeue.json").read_text())
    assert marker["exit_code"] == 75 and marker["step"] < 200, out[-3000:]
    stop = marker["step"]
    assert max(losses(run)) == stop  # rank 0 stopped after the same step rank 1 did
    state = json.loads((run / f"checkpoints/step-{stop:08d}/trainer_state.json").read_text())
    assert state["reason"] == "signal" and state["world_size"] == 2
    # torchrun reports the workers' 75 and exits 1 itself, hence the marker file for launchers
    assert proc.returncode == 1 and "exitcode  : 75" in out, out[-3000:]


@pytest.mark.full
def test_fsdp_checkpoint_resumes_on_two_ranks(shards, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    torchrun(shards, first, "fsdp")
    torchrun(shards, second, "fsdp", "--resume", str(first / "checkpoints/step-00000005"))
    a, b = losses(first), losses(second)
    assert sorted(b) == list(range(6, STEPS + 1))
    assert all(b[s] == pytest.approx(a[s], abs=1e-6) for s in b)
