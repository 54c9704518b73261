"""`kmoe audit replay`: 5 recorded steps of the tiny model re-executed on CPU reproduce the checkpoint bit for
bit; an altered recorded batch is reported at the first step it changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmoe.cli import main
from training.audit import minirun
from training.audit.replay import replay
from training.ledger_chain import LEDGER_FILE, read_lines


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints at steps 2 and 7 of a tiny run written by the reference loop."""
    run_dir = tmp_path_factory.mktemp("runs") / "replay"
    run, ledger = minirun.start(run_dir, minirun.make_config(["train.seed=11"]))
    for _ in range(7):
        minirun.logged_step(run, ledger)
        if run.step in (2, 7):
            minirun.save_checkpoint(run, ledger, run_dir)
    ledger.close()
    return run_dir


def test_replay_of_five_steps_is_bitwise(run_dir, capsys):
    assert main(["audit", "replay", str(run_dir), "--from-step", "2", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "steps 3..7" in out and "bit for bit" in out, out


def test_altered_recorded_batch_reports_the_first_diverging_step(run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "replay"
    shutil.copytree(run_dir, run)
    lines = [ln.record for ln in read_lines(run / LEDGER_FILE)]
    rec = next(r for r in lines if r["kind"] == "step" and r["step"] == 4)
    rec["samples"] = {"start": rec["samples"]["start"] + 100, "count": rec["samples"]["count"]}
    (run / LEDGER_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    res = replay(run, 2, 5)
    assert not res.ok and res.first_divergence == 4 and not res.bitwise
    assert (
        res.divergences[0].startswith("step 4 (seq ")
        and "batch does not match its hash" in res.divergences[0]
    )
    assert main(["audit", "replay", str(run), "--from-step", "2", "--steps", "5"]) == 1
    assert "first diverging step 4" in capsys.readouterr().out


def test_replay_needs_checkpoints_at_both_ends(run_dir):
    with pytest.raises(ValueError, match=r"checkpoints at steps 3 and 7; recorded checkpoints: \[2, 7\]"):
        replay(run_dir, 3, 4)
