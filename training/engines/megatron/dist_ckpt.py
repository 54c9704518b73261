"""megatron-core `dist_checkpointing` for the megatron engine: every rank writes and reads only its shards.

The model's sharded state dict names every tensor globally (layer and expert numbers, TP slices as offsets
into the full tensor), and the distributed optimizer is saved `fully_reshardable` (each parameter's moments in
model space), so a checkpoint saved at one TP/EP/PP/DP layout loads at any other. The layout-independent
record of what was saved is the engine's `param_digests` (kmoe names, the same for every layout).
"""

from __future__ import annotations

from pathlib import Path

import torch

OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _sharded(built, is_loading: bool) -> dict:
    model = built.model.module.sharded_state_dict()
    optimizer = built.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=OPTIMIZER_FORMAT)
    return {"model": model, "optimizer": optimizer}


def save(built, path: str | Path) -> None:
    """Write this rank's shards of model and optimizer into `path` (collective; `path` exists, empty)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(_sharded(built, is_loading=False), str(path))


@torch.no_grad()
def load(built, path: str | Path) -> None:
    """Read this rank's shards from a checkpoint saved at any layout (collective)."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(_sharded(built, is_loading=True), str(path))
    missing, unexpected = built.model.module.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not fit the model: missing {missing[:3]}, extra {unexpected[:3]}"
        )
    built.optimizer.load_state_dict(loaded["optimizer"])
