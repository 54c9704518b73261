"""`kmoe audit verify` and `init-check` pass on runs written by `kmoe train`: SIGKILLed and resumed with
`--resume auto`, or dying between a checkpoint and its ledger record, or before its signature; the wandb
summary carries the ledger head that `verify` reports."""

from __future__ import annotations

import glob
import os
import random
import signal
from pathlib import Path

import pytest
from test_train_resume import launch, wait_for_step  # the resume test's subprocess helpers

from kmoe.cli import main
from training.audit.replay import replay
from training.audit.verify import verify_run
from training.ledger import Ledger
from training.ledger_chain import LEDGER_FILE, read_lines
from training.signals import REQUEUE_EXIT_CODE
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/train/toy.yaml")


def records(run: Path) -> list[dict]:
    return [ln.record for ln in read_lines(run / LEDGER_FILE) if ln.record]


def events(run: Path, kind: str) -> list[dict]:
    return [r for r in records(run) if r["kind"] == "event" and r["event"] == kind]


def audited(run: Path, capsys) -> None:
    """verify and init-check both exit 0; the ledger's trajectory is steps 1..N with no gap."""
    assert main(["audit", "verify", str(run)]) == 0, capsys.readouterr().out
    assert main(["audit", "init-check", str(run)]) == 0, capsys.readouterr().out
    capsys.readouterr()


def train(shards: Path, run: Path, resume: str = "none", *sets: str) -> int:
    base = [f"data.shards={shards}", "train.steps=10", "checkpoint.every=5", "train.eval_every=0", *sets]
    args = ["train", "--config", CONFIG, "--run-dir", str(run), "--resume", resume]
    return main(args + [a for s in base for a in ("--set", s)])


def test_sigkill_then_resume_auto_verifies(shards, tmp_path, capsys):
    run = tmp_path / "killed"
    proc = launch(shards, run)  # `kmoe train`, 30 steps, a checkpoint every 5, the last 2 kept
    wait_for_step(proc, run, random.Random().randint(6, 24))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    again = launch(shards, run, resume="auto")
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out[-3000:]
    audited(run, capsys)
    (resume,) = events(run, "resume")
    assert 5 <= resume["step"] < 30 and resume["checkpoint"] == f"checkpoints/step-{resume['step']:08d}"
    assert events(run, "weights_load")[0]["model_root"] == resume["model_root"]
    assert replay(run, -2, None).bitwise  # the last two checkpoints, both after the resume


def _crash_at_first(monkeypatch, method: str) -> None:
    """The process dies inside Ledger.<method> the first time it runs (nothing of it reaches the file)."""
    real = getattr(Ledger, method)
    calls = []

    def dying(self, *a, **kw):
        if not calls:
            calls.append(1)
            raise RuntimeError("simulated crash")
        return real(self, *a, **kw)

    monkeypatch.setattr(Ledger, method, dying)


def test_checkpoint_written_but_never_recorded_is_set_aside(shards, tmp_path, monkeypatch, capsys):
    run = tmp_path / "unrecorded"
    _crash_at_first(monkeypatch, "checkpoint")  # dies after the step-5 checkpoint is on disk
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(shards, run)
    monkeypatch.undo()
    assert (run / "checkpoints/step-00000005/checkpoint.json").is_file()
    assert main(["audit", "verify", str(run)]) == 1  # unrecorded directory + unsigned tail
    capsys.readouterr()
    assert train(shards, run, "auto") == 0
    audited(run, capsys)
    (aside,) = events(run, "checkpoint_unrecorded")
    assert aside["path"] == "checkpoints/step-00000005" and (run / aside["moved_to"]).is_dir()
    (restart,) = events(run, "restart")  # no recorded checkpoint: the run began again from the init
    assert restart["model_root"] == records(run)[0]["init"]["merkle_root"] and not events(run, "resume")


def test_checkpoint_record_without_signature_is_signed_on_reopen(shards, tmp_path, monkeypatch, capsys):
    run = tmp_path / "unsigned"
    _crash_at_first(monkeypatch, "_sign")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(shards, run)
    monkeypatch.undo()
    assert records(run)[-1]["kind"] == "checkpoint"
    assert train(shards, run, "auto") == 0
    audited(run, capsys)
    (resume,) = events(run, "resume")
    assert resume["step"] == 5


def wandb_summaries(run: Path) -> list[dict[str, str]]:
    """The summary updates of an offline wandb run, read from its .wandb file (a LevelDB-style log of
    protobuf records: 7-byte file header, 32 KiB blocks, 7-byte chunk headers crc/len/type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run / "wandb/offline-run-*/run-*.wandb"))
    data, pos, block, buf, out = Path(path).read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "summary":
                out.append({u.key: u.value_json for u in rec.summary.update})
    return out


def test_wandb_summary_carries_the_ledger_head(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "wandb"
    assert train(shards, run, "none", "train.steps=5", "log.wandb=true") == 0
    ledger = [s for s in wandb_summaries(run) if "ledger_head" in s]
    v = verify_run(run)
    assert v.ok and len(ledger) == 2  # after the checkpoint and at the end
    assert ledger[-1]["ledger_head"] == f'"{v.summary["head"]}"'
    assert ledger[-1]["ledger_key_id"] == f'"{v.summary["key_id"]}"'
    key_id = v.summary["key_id"]
    assert main(["audit", "verify", str(run), "--pubkey", key_id]) == 0  # what an auditor pins from wandb
    assert "matches the pinned key from --pubkey" in capsys.readouterr().out


def test_stop_signal_right_after_an_interval_checkpoint_keeps_that_checkpoint(
    shards, tmp_path, monkeypatch, capsys
):
    """A stop signal that lands during a checkpoint stops the run at that step with that checkpoint: writing
    the step again would replace the files the ledger recorded (seen on SLURM preemption mid-checkpoint)."""
    real = Trainer._after_step

    def after_step(self) -> None:
        real(self)
        if self.state.step == 5:  # the interval checkpoint of step 5 is on disk and recorded
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_after_step", after_step)
    run = tmp_path / "stopped"
    assert train(shards, run) == REQUEUE_EXIT_CODE
    monkeypatch.undo()
    assert [r["step"] for r in records(run) if r["kind"] == "checkpoint"] == [5]
    assert events(run, "signal")[0]["step"] == 5
    assert main(["audit", "verify", str(run)]) == 0, capsys.readouterr().out
    assert train(shards, run, "auto") == 0
    audited(run, capsys)
    assert events(run, "resume")[0]["step"] == 5
