"""Checkpoint files (one process): atomic completion, retention, the manifest and its digests, loading
verified tensor by tensor, RNG round trip, the per-file hashes written once."""

import json

import pytest
import torch

from kmoe.hashing import layout_digest, sha256_file
from model.checkpoint import CheckpointError, load_model_dir, open_tensors
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
    state = fake_state(v)
    ts = {"trainer": {"step": step, "tokens": 10 * step}, "host_rng": {"rank0": rng_host}, "world_size": 1,
          "reason": "interval"}  # fmt: skip
    host = ckpt.HostState({"model": {}}, ts, {"rank0": rng_t}, state["optimizer"]["param_groups"])
    return ckpt.finish_save(ckpt.begin_save(root, step, ckpt.flatten_state(state), host))


def load(path):
    manifest = ckpt.read_manifest(path)
    flat = ckpt.flatten_state(fake_state(0.0))
    root = ckpt.load_into(path, manifest, flat)
    return flat, root, ckpt.load_host(path, manifest)


def test_round_trip_and_only_complete_dirs_count(tmp_path):
    rec = save(tmp_path, 5)
    (tmp_path / ".tmp-step-00000010").mkdir()  # a crash while writing
    (tmp_path / "step-00000010").mkdir()  # renamed but no checkpoint.json: not complete
    assert ckpt.latest(tmp_path).name == "step-00000005"
    flat, root, host = load(tmp_path / "step-00000005")
    assert torch.equal(flat["model/w"], torch.ones(2, 3))
    assert torch.equal(flat["optimizer/w/exp_avg"], torch.full((2, 3), 0.5))
    assert host["param_groups"] == [{"lr": 0.1, "params": ["w"]}]
    assert root == rec["roots"]["model"]
    ckpt.remove_partial(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))


def test_manifest_records_each_file_once_and_layout_digests(tmp_path):
    rec = save(tmp_path, 1, v=2.0)
    path = rec["path"]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert set(rec["files"]) == on_disk  # what the ledger records: every file, checkpoint.json included
    assert all(sha256_file(path / f) == h for f, h in rec["files"].items())
    manifest = json.loads((path / "checkpoint.json").read_text())
    assert manifest["tensors"]["model"]["w"]["digest"] == layout_digest(torch.full((2, 3), 2.0))
    assert manifest["tensors"]["optimizer"]["w/step"]["shape"] == []
    _, state = load_model_dir(path)  # the model part reads as a kmoe model checkpoint (export, lineage)
    assert torch.equal(state["w"], torch.full((2, 3), 2.0)) and open_tensors(path).names == ["b", "w"]


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
        load(tmp_path / "step-00000001")


def test_flipped_byte_and_missing_shard_are_refused(tmp_path):
    save(tmp_path, 1)
    shard = tmp_path / "step-00000001/optimizer/shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-2] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"tensor 'w/exp_avg' \(optimizer\) does not match"):
        load(tmp_path / "step-00000001")
    shard.unlink()
    with pytest.raises(CheckpointError, match="shard file optimizer/shard-00000.safetensors is missing"):
        load(tmp_path / "step-00000001")


def test_rng_state_restores(tmp_path):
    save(tmp_path, 1)
    a = torch.rand(3)
    _, _, host = load(tmp_path / "step-00000001")
    ts = host["trainer_state"]
    ckpt.restore_rng(ckpt.rank_rng(host["rng"], 1), ts["host_rng"]["rank0"])  # rank 1 falls back to rank 0
    assert torch.equal(torch.rand(3), a)
