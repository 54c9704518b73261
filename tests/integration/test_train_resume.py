"""Exact resume: a run killed (SIGKILL) or stopped (SIGTERM) at a random step and resumed with
`--resume auto` has the uninterrupted run's per-step losses bit for bit and its final weights."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.config import load_run_config
from training.parallel import DistInfo
from training.signals import REQUEUE_EXIT_CODE
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/train/toy.yaml")


def overrides(shards: Path) -> list[str]:
    return [f"data.shards={shards}", "train.steps=30", "checkpoint.every=5", "checkpoint.keep_last=2"]


def train_inprocess(shards: Path, run_dir: Path, resume: str = "none") -> int:
    cfg = load_run_config(CONFIG, overrides(shards))
    info = DistInfo(rank=0, world=1, local_rank=0, device=__import__("torch").device("cpu"))
    return Trainer(cfg, run_dir, info).run(resume)


def step_losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill, again after resume) keeps its last value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "step" in row and "loss" in row and "event" not in row:
            out[row["step"]] = row["loss"]
    return out


def resumed_from(run_dir: Path) -> int:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r.get("event") == "resume"]
    assert len(steps) == 1, steps
    return steps[0]


def final_digests(run_dir: Path, step: int = 30) -> dict[str, str]:
    return json.loads((run_dir / f"checkpoints/step-{step:08d}/digests.json").read_text())["tensors"]


def launch(shards: Path, run_dir: Path, resume: str = "none") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kmoe.cli", "train", "--config", CONFIG, "--run-dir", str(run_dir),
           "--resume", resume] + [a for o in overrides(shards) for a in ("--set", o)]  # fmt: skip
    # Same thread count as the in-process runs it is compared with (bit-exactness may depend on it).
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(REPO))
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> int:
    """Poll metrics.jsonl until a checkpoint exists and `step` was logged; returns the last logged step."""
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        if metrics.is_file():
            text = metrics.read_text()
            whole = text.split("\n")[:-1]  # the trainer may be writing the last line right now
            done = [json.loads(x).get("step", 0) for x in whole if '"loss"' in x and "event" not in x]
            if done and max(done) >= step and '"checkpoint"' in text:
                return max(done)
        time.sleep(0.002)
    raise AssertionError("trainer did not reach the step in time")


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight")
    assert train_inprocess(shards, run) == 0
    return run


def test_loss_falls(straight):
    losses = step_losses(straight)
    assert sorted(losses) == list(range(1, 31))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < first - 1.0, (first, last)


def test_sigkill_then_resume_auto_is_bit_identical(shards, straight, tmp_path):
    run = tmp_path / "killed"
    proc = launch(shards, run)
    reached = wait_for_step(proc, run, random.Random().randint(6, 24))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert reached < 30
    assert train_inprocess(shards, run, resume="auto") == 0
    assert 5 <= resumed_from(run) < 30  # it resumed from a checkpoint, not from scratch
    assert step_losses(run) == step_losses(straight)  # exact float equality, every step
    assert final_digests(run) == final_digests(straight)


def test_sigterm_checkpoints_and_requeues_then_resumes_identically(shards, straight, tmp_path):
    run = tmp_path / "termed"
    proc = launch(shards, run)
    wait_for_step(proc, run, random.Random().randint(6, 24))
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-3000:]
    stopped = max(step_losses(run))
    assert stopped < 30
    assert (run / f"checkpoints/step-{stopped:08d}/checkpoint.json").is_file()  # checkpoint on signal
    assert train_inprocess(shards, run, resume="auto") == 0
    assert resumed_from(run) == stopped
    assert step_losses(run) == step_losses(straight)
    assert final_digests(run) == final_digests(straight)


def flip_byte_in_tensor(path: Path, tensor: str) -> None:
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "fname,tensor",
    [
        ("model/shard-00000.safetensors", "layers.1.mlp.router.weight"),
        ("optimizer/shard-00000.safetensors", "embed.weight/exp_avg"),
    ],
)
def test_flipped_byte_is_refused_naming_the_tensor(shards, straight, tmp_path, fname, tensor):
    import shutil

    from model.checkpoint import CheckpointError

    run = tmp_path / "corrupt"
    shutil.copytree(straight, run)
    flip_byte_in_tensor(run / "checkpoints/step-00000030" / fname, tensor)
    with pytest.raises(CheckpointError, match=tensor.replace(".", r"\.")):
        train_inprocess(shards, run, resume="auto")


def test_final_checkpoint_exports_to_hf_and_generates(straight, tmp_path):
    from transformers import Glm4MoeForCausalLM

    from model.export_hf import export_hf
    from model.hf_check import load_ours

    ckpt = straight / "checkpoints/step-00000030"
    export_hf(ckpt, tmp_path / "hf", dtype="float32")
    hf = Glm4MoeForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    prompt = torch.tensor([list("오늘은 ".encode())])
    out = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    ours, tokens = load_ours(ckpt), prompt
    with torch.no_grad():
        for _ in range(8):  # greedy decoding with our model gives the same continuation
            tokens = torch.cat([tokens, ours(tokens).logits[:, -1:].argmax(-1)], dim=1)
    assert out.shape == (1, prompt.shape[1] + 8) and torch.equal(out, tokens)
