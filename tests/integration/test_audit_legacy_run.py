"""A run recorded before the layout-independent digest scheme (tests/fixtures/legacy-v1: `kmoe train` of a
micro toy model at commit 2d76c6f, whole-tensor sha256 digests, full-state checkpoints, genesis without a
`scheme`) still verifies, init-checks and replays, and resumes under today's code: the new checkpoint
records the Merkle scheme, and verify, init-check and replay accept the mixed ledger."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kmoe.cli import main
from kmoe.hashing import TENSOR_SCHEME
from training.audit.init_check import init_check
from training.audit.replay import replay
from training.audit.verify import verify_run
from training.ledger_chain import LEDGER_FILE, read_lines
from training.toy_shards import write_toy_shards

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures/legacy-v1"


@pytest.fixture
def legacy(tmp_path) -> tuple[Path, Path]:
    runs = tmp_path / "runs"
    shutil.copytree(FIXTURE, runs)
    (runs / ".keys/legacy.ed25519").chmod(0o600)
    return runs / "legacy", write_toy_shards(tmp_path / "toy", n_docs=40)  # the data it was trained on


def records(run: Path) -> list[dict]:
    return [ln.record for ln in read_lines(run / LEDGER_FILE) if ln.record]


def test_legacy_run_verifies_init_checks_and_replays(legacy):
    run, shards = legacy
    assert "scheme" not in records(run)[0]["init"]
    v = verify_run(run)
    assert v.ok, v.findings
    res = init_check(run)
    assert res.ok and res.rebuilt_root == res.recorded_root, res.findings
    rep = replay(run, 2, 2, shards=str(shards))
    assert rep.ok, rep.divergences


def test_legacy_run_resumes_and_the_mixed_ledger_audits(legacy, capsys):
    run, shards = legacy
    sets = [f"data.shards={shards}", "train.steps=8"]
    args = ["train", "--config", str(run / "config.yaml"), "--run-dir", str(run), "--resume", "auto"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    ckpts = [r for r in records(run) if r["kind"] == "checkpoint"]
    assert [c["step"] for c in ckpts] == [2, 4, 6, 8]
    assert "digest_scheme" not in ckpts[1] and ckpts[2]["digest_scheme"] == TENSOR_SCHEME
    # (replay 4 -> 6 would run under step 4's config, 4 steps long: the resume changed train.steps)
    for cmd in (["verify"], ["init-check"], ["replay", "--from-step", "6", "--shards", str(shards)]):
        assert main(["audit", cmd[0], str(run), *cmd[1:]]) == 0, capsys.readouterr().out
