"""`checkpoint.async_save`: interval checkpoints written by a background thread while training goes on hold
exactly the state of their step (same roots as synchronous checkpoints of the same run), the ledger records
them when complete (after later steps, marked `written_async`), `kmoe audit verify` accepts that, and a run
resumed from one ends where the synchronous run ended."""

from __future__ import annotations

from pathlib import Path

from conftest import TOY_CONFIG

from kmoe.cli import main
from training.ledger_chain import LEDGER_FILE, read_lines


def train(shards: Path, run: Path, *sets: str, resume: str = "none") -> None:
    base = [f"data.shards={shards}", "train.steps=12", "checkpoint.every=4", "train.eval_every=0", *sets]
    args = ["train", "--config", TOY_CONFIG, "--run-dir", str(run), "--resume", resume]
    assert main(args + [a for s in base for a in ("--set", s)]) == 0


def records(run: Path) -> list[dict]:
    return [ln.record for ln in read_lines(run / LEDGER_FILE) if ln.record]


def test_async_checkpoints_hold_their_step_and_verify(shards, tmp_path, capsys):
    sync, asy = tmp_path / "sync", tmp_path / "async"
    train(shards, sync)
    train(shards, asy, "checkpoint.async_save=true")
    ck_sync = {r["step"]: r for r in records(sync) if r["kind"] == "checkpoint"}
    ck_async = {r["step"]: r for r in records(asy) if r["kind"] == "checkpoint"}
    assert sorted(ck_async) == [4, 8, 12] and all(r.get("written_async") for r in ck_async.values())
    for key in ("model", "optimizer", "data"):  # (the RNG root is the process's: both runs share one)
        assert {s: r["roots"][key] for s, r in ck_async.items()} == {
            s: r["roots"][key] for s, r in ck_sync.items()
        }
    assert main(["audit", "verify", str(asy)]) == 0, capsys.readouterr().out
    # resumed from the async checkpoint of step 8, the run ends where the synchronous one did
    resumed = tmp_path / "resumed"
    train(shards, resumed, "checkpoint.async_save=true", resume=str(asy / "checkpoints/step-00000008"))
    final = [r for r in records(resumed) if r["kind"] == "checkpoint"][-1]
    assert final["step"] == 12 and final["roots"]["model"] == ck_sync[12]["roots"]["model"]


def test_lineage_reads_sharded_checkpoints(shards, tmp_path):
    from training.audit.lineage import compare_models

    run = tmp_path / "run"
    train(shards, run, "train.steps=8")
    res = compare_models(run / "checkpoints/step-00000004", run / "checkpoints/step-00000008")
    assert res["a"]["format"] == "kmoe" and res["verdict"] == "derived"
