"""The deepspeed engine's state in DeepSpeed's own sharded checkpoint format, and the conversions around it.

`save` writes `<dir>/deepspeed/` with `engine.save_checkpoint`: every rank its own ZeRO shards
(`zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, and under ZeRO-3 `zero_pp_rank_<r>_mp_rank_00_model_states.pt`),
rank 0 the module file `mp_rank_00_model_states.pt`, plus `buffers.safetensors` (the router's expert bias:
a universal checkpoint carries parameters only). `load` reads it back on the same number of ranks; on
another number it first converts the shards into a universal checkpoint (`ds_to_universal`: one folder per
parameter with its fp32 value and AdamW moments) and loads that (`load_universal`). `fp32_state` gives the
full fp32 weights by kmoe name (`zero_to_fp32`) for export. The files are torch pickles: callers verify their
recorded sha256 before any of them is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

SUBDIR = "deepspeed"  # inside a kmoe checkpoint directory
TAG = "state"  # DeepSpeed's tag: the folder holding the shards
LAYOUT_FILE = "zero_layout.json"  # ZeRO stage and data-parallel size the shards were written with
BUFFERS_FILE = "buffers.safetensors"


def shard_dir(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir) / SUBDIR


def save(ds_engine: Any, buffers: dict[str, torch.Tensor], ckpt_dir: Path, stage: int, dp_size: int) -> None:
    """Every rank writes its shards under `<ckpt_dir>/deepspeed/` (collective); rank 0 the `buffers`."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    out = shard_dir(ckpt_dir)
    # The universal-checkpoint marker lets ds_to_universal reshard these files later without patching them.
    info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    ds_engine.save_checkpoint(str(out), tag=TAG, client_state=info, save_latest=False)
    if dist.get_rank() == 0:
        (out / LAYOUT_FILE).write_text(json.dumps({"zero_stage": stage, "dp_size": dp_size}) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in buffers.items()}, str(out / BUFFERS_FILE))
        # save_checkpoint drops DeepSpeed's recovery scripts beside the shards; kmoe exports through
        # `fp32_state` instead, and a checkpoint holds only what it needs.
        for extra in ("zero_to_fp32.py", "zero_to_torch.py"):
            (out / extra).unlink(missing_ok=True)
    dist.barrier()


def saved_layout(ckpt_dir: Path) -> dict[str, int]:
    path = shard_dir(ckpt_dir) / LAYOUT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a deepspeed-engine checkpoint (no {LAYOUT_FILE})")
    return json.loads(path.read_text())


def load(
    ds_engine: Any, buffers: dict[str, torch.Tensor], ckpt_dir: Path, scratch: Path, dp_size: int
) -> None:
    """Load the shards of `ckpt_dir` into `ds_engine` and the saved buffers into `buffers` (collective). On
    a different data-parallel size (or ZeRO stage) the shards are first converted to a universal checkpoint
    under `scratch` (rank 0, then removed)."""
    saved = saved_layout(ckpt_dir)
    _load_buffers(buffers, shard_dir(ckpt_dir) / BUFFERS_FILE)
    same = saved["dp_size"] == dp_size and saved["zero_stage"] == ds_engine.zero_optimization_stage()
    if same:
        _load(ds_engine, shard_dir(ckpt_dir), universal=False)
        return
    log.info("%s: resharding ZeRO-%d x %d ranks -> ZeRO-%d x %d through a universal checkpoint", ckpt_dir,
             saved["zero_stage"], saved["dp_size"], ds_engine.zero_optimization_stage(), dp_size)  # fmt: skip
    universal = Path(scratch)
    try:
        if dist.get_rank() == 0:
            to_universal(shard_dir(ckpt_dir), universal)
        dist.barrier()
        _load(ds_engine, universal, universal=True)
        dist.barrier()
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(universal, ignore_errors=True)


@torch.no_grad()
def _load_buffers(buffers: dict[str, torch.Tensor], path: Path) -> None:
    saved = load_file(str(path))
    if set(saved) != set(buffers):
        raise ValueError(f"{path}: buffers {sorted(saved)} do not match the model's {sorted(buffers)}")
    for name, buf in buffers.items():
        buf.copy_(saved[name].to(buf.device, buf.dtype))


def _load(ds_engine: Any, load_dir: Path, universal: bool) -> None:
    groups = ds_engine.optimizer.param_groups
    settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    # DeepSpeed reads `checkpoint.load_universal` from its config at each load_checkpoint call; the engine is
    # built before the trainer knows which checkpoint it resumes from, so the flag is set per load.
    ds_engine._config.load_universal_checkpoint = universal
    try:
        path, _ = ds_engine.load_checkpoint(
            str(load_dir),
            tag=TAG,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    finally:
        ds_engine._config.load_universal_checkpoint = False
    # ZeRO-3's universal load copies the first param group's settings into every group (the no-decay group
    # would get weight decay); the groups' settings are the run config's, so they are put back. It also gives
    # every flat partition the same `step` tensor, which AdamW increments in place once per partition.
    for g, kept in zip(groups, settings, strict=True):
        g.update(kept)
    for state in ds_engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    if path is None:
        raise FileNotFoundError(f"{load_dir}: DeepSpeed found no checkpoint '{TAG}' to load")


def to_universal(shards: Path, out: Path) -> None:
    """`ds_to_universal` of `<shards>/<TAG>` into `<out>/<TAG>` (one process; its progress output goes to the log)."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    (out / TAG).mkdir(parents=True)
    args = argparse.Namespace(
        input_folder=str(shards / TAG),
        output_folder=str(out / TAG),
        num_extract_workers=1,  # no process pool: ranks already run as processes
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ds_to_universal.main(args)
    log.debug("ds_to_universal: %s", text.getvalue())


def fp32_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights by kmoe name from the ZeRO shards (DeepSpeed's zero_to_fp32), on one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        state = get_fp32_state_dict_from_zero_checkpoint(str(shard_dir(ckpt_dir)), tag=TAG)
    return {k: v.contiguous() for k, v in state.items()}
