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


def _ensure_adam_state(optimizer) -> None:
    """AdamW state for every main parameter of a fresh optimizer (zeros, step 0) to load into.

    megatron 0.16.1's distributed optimizer reads the Adam `step` from the state while building the sharded
    state dict it loads into, and torch's AdamW has none before its first step (TE/Apex Adam keep it in the
    param groups instead).
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                st = opt.optimizer.state[p]
                if not st:
                    st.update(
                        step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p)
                    )


@torch.no_grad()
def load(built, path: str | Path) -> None:
    """Read this rank's shards from a checkpoint saved at any layout (collective)."""
    from megatron.core import dist_checkpointing

    _ensure_adam_state(built.optimizer)
    loaded = dist_checkpointing.load(_sharded(built, is_loading=True), str(path))
    missing, unexpected = built.model.module.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not fit the model: missing {missing[:3]}, extra {unexpected[:3]}"
        )
    _load_optimizer(built.optimizer, loaded["optimizer"])


def _load_optimizer(optimizer, state) -> None:
    """megatron's DistributedOptimizer.load_state_dict, in two parts.

    With torch's AdamW (no TE/Apex), 0.16.1 puts `step` into every parameter's state and then requires the
    fully reshardable parameter state to carry it too, which it never does (KeyError 'step'). So: the param
    groups (and step) first, then the per-parameter state with `step` set aside, then `step` back.
    """
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [state] if len(opts) == 1 else [v for _, v in sorted(state.items())]
    for opt, part in zip(opts, parts, strict=True):
        part = dict(part)
        param_state = part.pop("param_state")
        part.pop("param_state_sharding_type", None)
        opt.load_state_dict(part)
        steps = {p: st.pop("step") for p, st in opt.optimizer.state.items() if "step" in st}
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            opt.optimizer.state[p]["step"] = step
