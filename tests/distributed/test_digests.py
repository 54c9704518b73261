"""Layout-independent digests on 4 gloo ranks: DTensors on 1-D and 2-D meshes (Shard(0) uneven, Shard(1),
EP x FSDP, Replicate) and an FSDP2-sharded model give exactly the digests of the full tensors, with no
tensor gathered; a Partial placement is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gloo_ranks import run_gloo

from kmoe.hashing import layout_digest

pytestmark = pytest.mark.distributed

CASES = {  # name: (shape, mesh shape, placements as (kind, dim))
    "fsdp_uneven": ((10, 300), (4,), [("S", 0)]),
    "fsdp_1d_norm": ((4000,), (4,), [("S", 0)]),
    "fsdp_dim1": ((6, 3000), (4,), [("S", 1)]),
    "replicated": ((5, 7), (4,), [("R", 0)]),
    "ep_x_fsdp": ((8, 6, 2100), (2, 2), [("S", 0), ("S", 0)]),
    "ep_x_fsdp_dim1": ((8, 6, 2100), (2, 2), [("S", 0), ("S", 1)]),
    "replicate_x_shard": ((9, 1500), (2, 2), [("R", 0), ("S", 0)]),
}


def full_tensor(name: str) -> torch.Tensor:
    shape = CASES[name][0]
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(map(ord, name))))


def worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from kmoe.hashing import DigestError
    from training.digests import sharded_digests

    state = {}
    for name, (_, mesh_shape, places) in CASES.items():
        mesh = init_device_mesh("cpu", mesh_shape)
        placements = [Shard(d) if k == "S" else Replicate() for k, d in places]
        state[name] = distribute_tensor(full_tensor(name), mesh, placements)
        assert state[name].to_local().numel() < full_tensor(name).numel() or "S" not in {k for k, _ in places}
    got = sharded_digests(state)
    got["fsdp_model"] = fsdp_model_digests()
    mesh = init_device_mesh("cpu", (4,))
    try:
        sharded_digests({"partial": DTensor.from_local(torch.ones(4), mesh, [Partial()])})
        refused = ""
    except DigestError as e:
        refused = str(e)
    if rank == 0:
        Path(out).write_text(json.dumps({"digests": got, "refused": refused}))


def toy_model():
    from model import MoETransformer
    from model.init import init_weights
    from training.config import load_run_config

    cfg = load_run_config(str(Path(__file__).resolve().parents[2] / "configs/train/toy.yaml"))
    return cfg, MoETransformer, init_weights


def fsdp_model_digests() -> dict[str, str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from training.digests import sharded_digests

    cfg, MoETransformer, init_weights = toy_model()
    model = MoETransformer(cfg.model)
    init_weights(model, cfg.model, 7)
    mesh = init_device_mesh("cpu", (4,))
    for blk in model.layers:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return sharded_digests(get_model_state_dict(model))


def test_sharded_digests_equal_full_tensor_digests(tmp_path):
    out = tmp_path / "result.json"
    run_gloo(worker, 4, tmp_path, str(out))
    res = json.loads(out.read_text())
    for name in CASES:
        assert res["digests"][name] == layout_digest(full_tensor(name)), name
    cfg, MoETransformer, init_weights = toy_model()
    model = MoETransformer(cfg.model)
    init_weights(model, cfg.model, 7)
    full = {k: layout_digest(v) for k, v in model.state_dict().items()}
    assert res["digests"]["fsdp_model"] == full
    assert "Partial" in res["refused"]
