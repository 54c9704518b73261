"""`kmoe audit replay` on a run written by `kmoe train` (the toy config on byte-level shards): 5 recorded steps
re-executed through the trainer's own step function reproduce the next checkpoint bit for bit; a recorded
batch altered in the ledger, or shard bytes altered on disk, is reported at the first step it changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kmoe.cli import main
from training.audit.init_check import read_genesis
from training.audit.replay import replay
from training.ledger_chain import LEDGER_FILE, read_lines

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/train/toy.yaml")


@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory) -> Path:
    """10 steps of `kmoe train`, checkpoints at 5 and 10 (the real CLI, ledger on)."""
    run = tmp_path_factory.mktemp("runs") / "toy"
    sets = [f"data.shards={shards}", "train.steps=10", "checkpoint.every=5", "train.eval_every=0"]
    args = ["train", "--config", CONFIG, "--run-dir", str(run)] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0
    return run


def steps(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in (ln.record for ln in read_lines(run / LEDGER_FILE)) if r["kind"] == "step"}


def test_genesis_names_the_trainer_and_replay_is_bitwise(run_dir, capsys):
    assert read_genesis(run_dir)["trainer"] == "kmoe-train"
    assert main(["audit", "replay", str(run_dir), "--from-step", "5", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "steps 6..10" in out and "compared with checkpoints/step-00000010" in out and "bit for bit" in out
    res = replay(run_dir, -2, None)  # the second-to-last checkpoint on disk up to the next one: the same span
    assert res.ok and res.bitwise and (res.from_step, res.to_step) == (5, 10)


def test_altered_recorded_batch_reports_the_first_diverging_step(run_dir, tmp_path, capsys):
    run = tmp_path / "toy"
    shutil.copytree(run_dir, run)
    lines = [ln.record for ln in read_lines(run / LEDGER_FILE)]
    rec = next(r for r in lines if r["kind"] == "step" and r["step"] == 7)
    rec["samples"] = {"start": rec["samples"]["start"] + 16, "count": rec["samples"]["count"]}  # batch 8's
    (run / LEDGER_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    res = replay(run, 5, 5)
    assert not res.ok and not res.bitwise and res.first_divergence == 7
    assert (
        res.divergences[0].startswith("step 7 (seq ")
        and "batch does not match its hash" in res.divergences[0]
    )
    assert main(["audit", "replay", str(run), "--from-step", "5", "--steps", "5"]) == 1
    assert "first diverging step 7" in capsys.readouterr().out


def test_altered_shard_bytes_are_reported_at_the_first_step_that_reads_them(run_dir, shards, tmp_path):
    moved = tmp_path / "data"
    shutil.copytree(shards, moved)
    ko = moved / "shards/ko.bin"
    tokens = np.fromfile(ko, dtype=np.uint16)
    np.where(tokens < 256, tokens ^ 1, tokens).astype(np.uint16).tofile(ko)  # every Korean byte changed
    first_ko = min(s for s, r in steps(run_dir).items() if s > 5 and r["lang_tokens"].get("ko", 0) > 0)
    res = replay(run_dir, 5, 5, shards=str(moved))
    assert not res.ok and res.first_divergence == first_ko, res.divergences
    assert "batch does not match its hash" in res.divergences[0]
    assert replay(run_dir, 5, 5, shards=str(shards)).bitwise  # the untouched data, named the same way


def test_replay_needs_a_checkpoint_at_the_end(run_dir):
    with pytest.raises(ValueError, match=r"checkpoints at steps 5 and 8; recorded checkpoints: \[5, 10\]"):
        replay(run_dir, 5, 3)
    with pytest.raises(ValueError, match=r"checkpoints at steps 6 and 10; recorded checkpoints: \[5, 10\]"):
        replay(run_dir, 6, 4)


def test_a_run_of_the_retired_reference_loop_is_refused_saying_why(run_dir, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(run_dir, run)
    lines = [ln.record for ln in read_lines(run / LEDGER_FILE)]
    lines[0]["trainer"] = "kmoe-minirun"  # what training/audit/minirun.py wrote into genesis
    (run / LEDGER_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(ValueError, match=r"cannot be replayed: the reference loop .*minirun.py was removed"):
        replay(run, 5, 5)
