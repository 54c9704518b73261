"""DeepSpeed on this process: importing it without JIT-built ops, its process group, and building kmoe's model
for a ZeRO stage from the seed, by tensor name, as training/parallel.py does for the native engine.
"""

from __future__ import annotations

import logging
import os
import warnings
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from model import MoETransformer
from model.init import init_value
from model.transformer import Block

from ...config import RunConfig
from ...parallel import DistInfo, init_by_name

log = logging.getLogger(__name__)


def deepspeed_module() -> ModuleType:
    """`import deepspeed` for this machine: its CPU accelerator when there is no GPU, quiet logs, and none of
    the ops it would JIT-compile (they need a compiler and minutes; the engine uses torch's AdamW)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # DeepSpeed's shared-memory all-reduce serves its inference path only; left compatible, the comm backend
    # JIT-builds it into ~/.cache/torch_extensions on every first use (a minutes-long compile that blocks all
    # ranks on a file lock). deepspeed.ops caches this dict so that edits like this one persist.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its config dump and per-step INFO lines
    # DeepSpeed still calls the tensor collectives torch renamed; one warning per call floods the log.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )  # fmt: skip
    return deepspeed


def ensure_process_group(ds: ModuleType, info: DistInfo) -> None:
    """DeepSpeed's communication over the run's process group; on one rank (no torchrun) a one-rank group on
    an in-memory store, as DeepSpeed needs one even then."""
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))  # DeepSpeed reads it; torchrun sets it
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if info.world > 1:
            raise RuntimeError(
                "the deepspeed engine on several ranks needs torch.distributed set up (torchrun)"
            )
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    ds.init_distributed(dist_backend=backend, dist_init_required=False)  # wraps the existing group


def build_model(ds: ModuleType, cfg: RunConfig, seed: int, conf: dict[str, Any]) -> MoETransformer:
    """kmoe's model initialised from `seed` by tensor name; under ZeRO-3 built partitioned (`zero.Init`), so
    no rank ever holds all of it, and each tensor set from its full value one at a time."""
    if cfg.engine.zero_stage != 3:
        model = MoETransformer(cfg.model)
        init_by_name(model, cfg, seed)
        return model
    with ds.zero.Init(config_dict_or_path=conf):
        model = MoETransformer(cfg.model)
    init_partitioned(ds, model, cfg, seed)
    # The MoE block runs a data-dependent subset of its experts, which breaks ZeRO-3's trace-based prefetch
    # (hangs, DeepSpeed #7461); inside a leaf module all parameters are gathered together before it runs. The
    # leaf is the whole transformer block holding the MoE (attention + experts, FSDP2's unit in the native
    # engine): ZeRO-3's hooks on every submodule reorder how autograd sums a tensor's gradient contributions
    # (q/k/v of one input), so with the MoE alone as the leaf the gradients differ from the native engine's
    # in the last bits; with the block as the leaf they are bit for bit the same.
    ds.utils.set_z3_leaf_modules(model, [Block])
    return model


@torch.no_grad()
def init_partitioned(ds: ModuleType, model: MoETransformer, cfg: RunConfig, seed: int) -> None:
    """model/init.py's value of every tensor of a ZeRO-3 partitioned model (one tensor gathered at a time)."""
    for name, p in model.named_parameters():
        with ds.zero.GatheredParameters([p], modifier_rank=0):
            if dist.get_rank() == 0:
                p.copy_(init_value(name, p.shape, cfg.model, seed).to(p.dtype))
    persistent = persistent_buffers(model)
    for name, buf in model.named_buffers():
        if name in persistent:
            buf.copy_(init_value(name, buf.shape, cfg.model, seed).to(buf.dtype))
        else:  # expert load counters start at zero
            buf.zero_()


def persistent_buffers(model: torch.nn.Module) -> set[str]:
    """Names of the buffers a state dict holds (the router's expert bias), not the load counters."""
    params = {n for n, _ in model.named_parameters()}
    return set(model.state_dict(keep_vars=True)) - params
