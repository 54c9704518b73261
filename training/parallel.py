"""Process groups and model wrapping: single process, DDP, FSDP2; activation checkpointing, torch.compile.

`model/` knows nothing of this: the model is built here (on the meta device for FSDP2), wrapped, and
initialised from the seed by tensor name, so every layout starts from bit-identical weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from model import MoETransformer
from model.init import init_value

from .config import RunConfig
from .dims import native_strategy

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed() -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return DistInfo(rank, world, local, device)


def build_model(cfg: RunConfig, info: DistInfo, seed: int) -> tuple[nn.Module, MoETransformer]:
    """(the module to call for training, the inner MoETransformer) for the configured strategy."""
    strategy = native_strategy(cfg, info.world)
    if strategy == "fsdp":
        return _build_fsdp(cfg, info, seed)
    model = MoETransformer(cfg.model)
    init_by_name(model, cfg, seed)
    model.to(info.device)
    _apply_ac_compile(model, cfg)
    if strategy == "ddp":
        ids = [info.local_rank] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids), model
    return model, model


def _apply_ac_compile(model: MoETransformer, cfg: RunConfig) -> None:
    if cfg.train.activation_checkpointing:
        # The composable API keeps parameter names unchanged (checkpoints stay in kmoe's names).
        # Recompute runs the MoE forward twice, so expert-load counts double; bias updates and the
        # balance statistics only use their signs and shares, which doubling leaves unchanged.
        from torch.distributed._composable import checkpoint

        for blk in model.layers:
            checkpoint(blk)
    if cfg.train.compile:
        # Whole blocks on GPU in bf16 (grouped_mm compiles there); on CPU, inductor's grouped_mm wants
        # bf16 and the expert loop has data-dependent shapes, so only the dense parts are compiled.
        whole = torch.cuda.is_available() and cfg.train.precision == "bf16"
        for blk in model.layers:
            if whole:
                blk.compile()
                continue
            blk.attn.compile()
            dense = blk.mlp if not hasattr(blk.mlp, "experts") else blk.mlp.shared
            if dense is not None:
                dense.compile()


def _build_fsdp(cfg: RunConfig, info: DistInfo, seed: int) -> tuple[nn.Module, MoETransformer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    _apply_ac_compile(model, cfg)
    mesh = init_device_mesh(info.device.type, (info.world,), mesh_dim_names=("dp",))
    mp = MixedPrecisionPolicy()
    if cfg.train.precision == "bf16" and info.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for blk in model.layers:
        fully_shard(blk, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=info.device)
    init_by_name(model, cfg, seed)
    return model, model


@torch.no_grad()
def init_by_name(model: nn.Module, cfg: RunConfig, seed: int) -> None:
    """model/init.py's per-name values; a sharded (DTensor) tensor gets its shard of the full value."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    persistent = model.state_dict(keep_vars=True)
    for name, t in persistent.items():
        full = init_value(name, t.shape, cfg.model, seed)
        if isinstance(t, DTensor):
            local = distribute_tensor(full.to(t.device), t.device_mesh, t.placements, src_data_rank=None)
            t.to_local().copy_(local.to_local().to(t.dtype))
        else:
            t.copy_(full.to(t.dtype))
    names = {id(t) for t in persistent.values()}
    for _, buf in model.named_buffers():
        if id(buf) not in names:  # non-persistent buffers (expert load counters) start at zero
            buf.zero_()


def barrier(info: DistInfo) -> None:
    if info.initialized:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.initialized:
        dist.destroy_process_group()
