"""`kmoe audit replay` on an auditor's machine that differs from the trainer's: a run trained at 1 thread replays
bit for bit in a process that has 2 (replay sets the recorded thread count), and by tolerance at 2 threads when
told to keep them; a run with one recorded batch altered fails at that step under both thread counts, whether
the ledger was re-signed to name another batch or the run trained on another batch than it recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TOY_CONFIG

from kmoe.cli import main
from kmoe.hashing import sha256_json
from training.audit.init_check import read_genesis
from training.audit.replay import replay
from training.ledger_chain import LEDGER_FILE, SIG_DOMAIN, read_lines
from training.ledger_keys import find_key
from training.trainer import Trainer

ALTERED = 7  # the step whose batch is altered


@pytest.fixture(autouse=True)
def keep_thread_count():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def train(shards: Path, run: Path) -> Path:
    """10 steps of the toy model at 1 thread, checkpoints at 5 and 10."""
    sets = [f"data.shards={shards}", "train.steps=10", "checkpoint.every=5", "train.eval_every=0"]
    torch.set_num_threads(1)
    assert (
        main(
            ["train", "--config", TOY_CONFIG, "--run-dir", str(run)] + [a for s in sets for a in ("--set", s)]
        )
        == 0
    )
    return run


@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory) -> Path:
    return train(shards, tmp_path_factory.mktemp("runs") / "toy")


@pytest.fixture(scope="module")
def trained_on_another_batch(shards, tmp_path_factory) -> Path:
    """Step 7 trained on batch 8's tokens while its record names batch 7 (indices and hash)."""
    train_step = Trainer._train_step  # trains on a batch; apply_batch records the batch it was given

    def swapped(self, batch):
        if self.state.step + 1 == ALTERED:
            other = self.data.global_batch(batch.index + 1)
            batch = type(batch)(**{**batch.__dict__, "tokens_GS": other.tokens_GS, "labels_GS": other.labels_GS,
                                   "loss_mask_GS": other.loss_mask_GS})  # fmt: skip
        return train_step(self, batch)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "_train_step", swapped)
        return train(shards, tmp_path_factory.mktemp("runs") / "toy")


def resigned_naming_another_batch(run_dir: Path, tmp_path: Path) -> Path:
    """A copy whose step-7 record names batch 8 (indices and hash), rechained and re-signed with the run's key."""
    run = tmp_path / "toy"
    shutil.copytree(run_dir, run)
    recs = [ln.record for ln in read_lines(run / LEDGER_FILE)]
    steps = {r["step"]: r for r in recs if r["kind"] == "step"}
    steps[ALTERED]["samples"] = steps[ALTERED + 1]["samples"]
    steps[ALTERED]["batch_hash"] = steps[ALTERED + 1]["batch_hash"]
    key, _ = find_key(run_dir, read_genesis(run_dir)["key_id"])
    prev = "0" * 64
    for i, r in enumerate(recs):
        r["seq"], r["prev"] = i, prev
        if r["kind"] == "signature":
            r["sig"] = key.sign(SIG_DOMAIN + prev.encode()).hex()
        prev = sha256_json(r)
    (run / LEDGER_FILE).write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["audit", "verify", str(run)]) == 0  # a self-consistent, signed record: only replay can tell
    return run


def test_genesis_records_the_numerical_environment(run_dir):
    numerics = read_genesis(run_dir)["environment"]["numerics"]
    assert numerics["threads"] == 1 and numerics["torch"] == torch.__version__
    assert numerics["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert numerics["deterministic_algorithms"] is False and numerics["float32_matmul_precision"] == "highest"


def test_auditor_with_two_threads_replays_bit_for_bit(run_dir, capsys):
    torch.set_num_threads(2)  # the auditor's process
    assert main(["audit", "replay", str(run_dir), "--from-step", "5"]) == 0
    out = capsys.readouterr().out
    assert "set to the recorded threads 1 (was 2)" in out and "replay: OK, bit for bit" in out, out
    assert torch.get_num_threads() == 2  # put back afterwards


def test_kept_two_threads_replays_within_tolerance_and_says_why(run_dir, capsys):
    torch.set_num_threads(1)
    assert main(["audit", "replay", str(run_dir), "--from-step", "5", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "environment differs: threads 1 recorded, 2 here" in out, out
    res = replay(run_dir, 5, 5, threads=2)
    assert torch.get_num_threads() == 1
    if res.bitwise:  # a CPU whose kernels split this work the same way at 2 threads: nothing to tell apart
        return
    assert "OK within tolerance, not bit for bit (the environment differs as listed)" in out, out
    assert res.ok and res.relative_distance < 1e-4 and max(res.max_deviation.values()) < 1e-5  # here ~1e-7
    assert main(["audit", "replay", str(run_dir), "--from-step", "5", "--threads", "2", "--exact"]) == 1


@pytest.mark.parametrize("threads", [None, 2], ids=["recorded-threads", "two-threads"])
@pytest.mark.parametrize("how", ["resigned", "trained"])
def test_altered_batch_fails_at_its_step(run_dir, trained_on_another_batch, tmp_path, capsys, how, threads):
    run = resigned_naming_another_batch(run_dir, tmp_path) if how == "resigned" else trained_on_another_batch
    res = replay(run, 5, 5, threads=threads)
    assert not res.ok and res.first_divergence == ALTERED, res.divergences
    assert res.divergences[0].startswith(f"step {ALTERED} (seq ") and "loss" in res.divergences[0]
    assert "batch does not match its hash" not in " ".join(res.divergences)  # the hash matches what is named
    assert res.relative_distance > 1e-2  # the weights tell it too, far above float-order noise
    args = ["audit", "replay", str(run), "--from-step", "5"] + (
        ["--threads", str(threads)] if threads else []
    )
    assert main(args) == 1 and f"FAILED, first diverging step {ALTERED}" in capsys.readouterr().out
