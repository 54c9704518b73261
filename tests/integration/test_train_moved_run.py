"""Run directories move: a run that died mid-way is renamed, copied beside itself, or copied to another place;
`kmoe train --resume auto` continues each (the signing key found by the key id its ledger names) and
`kmoe audit verify` passes. A key that is nowhere to be found is one line on every rank, before anything is
written, without a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TOY_CONFIG

from kmoe.cli import main
from training.ledger_chain import LEDGER_FILE
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def train_args(shards: Path, run: Path, *extra: str) -> list[str]:
    sets = [f"data.shards={shards}", "train.steps=8", "checkpoint.every=3", "train.eval_every=0"]
    return ["train", "--config", TOY_CONFIG, "--run-dir", str(run), "--resume", "auto", *extra] + [
        a for s in sets for a in ("--set", s)
    ]


@pytest.fixture(scope="module")
def crashed(shards, tmp_path_factory) -> Path:
    """`<tmp>/runs/toy` (key in `<tmp>/runs/.keys`): died after step 5, its last checkpoint at step 3."""
    run = tmp_path_factory.mktemp("moved") / "runs" / "toy"
    after_step = Trainer._after_step

    def crash(self):
        after_step(self)
        if self.state.step == 5:
            raise RuntimeError("simulated crash")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "_after_step", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(train_args(shards, run))
    return run


def runs_copy(crashed: Path, tmp_path: Path) -> Path:
    """A copy of the crashed run's parent folder (the run and its `.keys`)."""
    shutil.copytree(crashed.parent, tmp_path / "runs")
    return tmp_path / "runs" / crashed.name


def resumes_and_verifies(shards: Path, run: Path, capsys, *extra: str) -> None:
    assert main(train_args(shards, run, *extra)) == 0
    assert main(["audit", "verify", str(run)]) == 0, capsys.readouterr().out
    ledger = (run / LEDGER_FILE).read_text()
    assert '"event":"resume"' in ledger and '"status":"completed"' in ledger


def test_renamed_run_resumes_and_verifies(shards, crashed, tmp_path, capsys):
    run = runs_copy(crashed, tmp_path)
    resumes_and_verifies(shards, run.rename(run.with_name("toy-renamed")), capsys)


def test_run_copied_beside_itself_resumes_and_verifies(shards, crashed, tmp_path, capsys):
    run = runs_copy(crashed, tmp_path)
    copy = run.with_name("toy-copy")
    shutil.copytree(run, copy)
    resumes_and_verifies(shards, copy, capsys)
    resumes_and_verifies(shards, run, capsys)  # the original goes on too, with the same key


def test_run_copied_elsewhere_needs_its_key_dir_and_says_so(shards, crashed, tmp_path, capsys):
    moved = tmp_path / "project" / "toy"
    shutil.copytree(crashed, moved)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(train_args(shards, moved)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "signing key" in err and "--key-dir DIR" in err, err
    assert err.startswith("kmoe: error: ") and "Traceback" not in err
    assert str(tmp_path / "project" / ".keys") in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    resumes_and_verifies(shards, moved, capsys, "--key-dir", str(crashed.parent / ".keys"))


def test_missing_key_is_one_line_on_every_rank(shards, crashed, tmp_path):
    moved = tmp_path / "project" / "toy"
    shutil.copytree(crashed, moved)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "kmoe.cli", *train_args(shards, moved)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("kmoe: error:")]
    assert len(errors) == 2, proc.stderr  # rank 0's finding, and rank 1 told the same
    assert "signing key" in errors[0] and "--key FILE" in errors[0], errors
    assert errors[0] == errors[1], errors
    # the one traceback is torchrun's own report of a failed worker (ChildFailedError), none from a rank
    assert proc.stderr.count("Traceback") == 1 and "ChildFailedError" in proc.stderr, proc.stderr
    assert "Connection closed" not in proc.stderr and "gloo" not in proc.stderr.lower(), proc.stderr
