"""Checkpoint files: atomic completion, retention, verification, optimizer round trip."""

import json

import pytest
import torch

from model.checkpoint import CheckpointError
from training import checkpoint as ckpt


def fake_state(v: float) -> dict:
    return {
        "model": {"w": torch.full((2, 3), v), "b": torch.zeros(3)},
        "optimizer": {
            "state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.full((2, 3), v / 2)}},
            "param_groups": [{"lr": 0.1, "params": ["w"]}],
        },
    }


def save(root, step, v=1.0):
    rng_t, rng_host = ckpt.rng_state()
    return ckpt.save(root, step, fake_state(v), {"model": {}}, {"trainer": {"step": step}, "host_rng": {"rank0": rng_host}},
                     {"rank0": rng_t})  # fmt: skip


def test_round_trip_and_only_complete_dirs_count(tmp_path):
    save(tmp_path, 5)
    (tmp_path / ".tmp-step-00000010-123").mkdir()  # a crash while writing
    (tmp_path / "step-00000010").mkdir()  # renamed but no checkpoint.json: not complete
    assert ckpt.latest(tmp_path).name == "step-00000005"
    loaded = ckpt.load(tmp_path / "step-00000005")
    assert torch.equal(loaded["model"]["w"], torch.ones(2, 3))
    assert torch.equal(loaded["optimizer"]["state"]["w"]["exp_avg"], torch.full((2, 3), 0.5))
    assert loaded["optimizer"]["param_groups"] == [{"lr": 0.1, "params": ["w"]}]
    ckpt.remove_partial(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))


def test_retention_keeps_last_n_and_every_k(tmp_path):
    for step in range(10, 80, 10):
        save(tmp_path, step)
    ckpt.prune(tmp_path, keep_last=2, keep_every=30)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [30, 60, 70]


def test_modified_json_file_is_refused(tmp_path):
    save(tmp_path, 1)
    path = tmp_path / "step-00000001" / "trainer_state.json"
    data = json.loads(path.read_text())
    data["trainer"]["step"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        ckpt.load(tmp_path / "step-00000001")


def test_rng_state_restores(tmp_path):
    save(tmp_path, 1)
    a = torch.rand(3)
    loaded = ckpt.load(tmp_path / "step-00000001")
    ts = loaded["trainer_state"]
    ckpt.restore_rng(ckpt.rank_rng(loaded["rng"], 1), ts["host_rng"]["rank0"])  # rank 1 falls back to rank 0
    assert torch.equal(torch.rand(3), a)
