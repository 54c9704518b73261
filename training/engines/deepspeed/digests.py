"""Layout-independent digests (kmoe.hashing TENSOR_SCHEME) of a ZeRO-partitioned model and optimizer, computed
where the partitions are: each rank hashes the flat range of every tensor it owns and only tree nodes travel.

ZeRO-1/2 cut the concatenation of a param group's flattened tensors into equal ranges, one per rank, so a rank
owns a contiguous range of some tensors (DeepSpeed's `_hp_mapping` fragment of each parameter). ZeRO-3 cuts
every tensor's flattening into `ceil(numel / ranks)` elements per rank, the last range padded. Either way a
rank's part is a flat range, which `kmoe.hashing.flat_pieces` hashes; buffers (the router bias), whole on every
rank, are hashed by one rank each. The values are ZeRO's fp32 master weights (what the native engine's fp32
parameters are), or an AdamW moment.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import torch
import torch.distributed as dist
from torch import nn

from kmoe.hashing import Pieces, TensorMeta, box_pieces, flat_pieces, meta_of

from ...digests import NamedPieces, gather_combine
from .state import persistent_buffer_items

FP32 = "float32"


def owned_ranges(
    ds: ModuleType, module: nn.Module, key: str | None = None
) -> Iterator[tuple[str, tuple[int, ...], int, torch.Tensor | None]]:
    """(name, full shape, start, fp32 elements) of the flat range of each parameter this rank owns; the
    elements are None where it owns none of it. `key`: an AdamW moment instead of the master weight."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, p in module.named_parameters():
        if hasattr(p, "ds_id"):  # ZeRO-3
            shape, numel = tuple(p.ds_shape), p.ds_numel
            if key is None:
                local = ds.utils.safe_get_local_fp32_param(p)
            else:
                local = ds.utils.safe_get_local_optimizer_state(p, key)
            part = -(-numel // world)
            start = rank * part
            valid = max(0, min(part, numel - start))  # the last rank's range ends in padding
            yield name, shape, start, local.flatten()[:valid] if valid else None
            continue
        shape, mapping = tuple(p.shape), getattr(p, "_hp_mapping", None)  # ZeRO-1/2
        if mapping is None:
            yield name, shape, 0, None
            continue
        address = mapping.lp_fragment_address
        yield name, shape, address.start, mapping.get_hp_fragment(key).flatten()


def local_pieces(
    ds: ModuleType, module: nn.Module, key: str | None = None, buffers: bool = True
) -> NamedPieces:
    """This rank's pieces of every parameter (and, with `buffers`, persistent buffer) of `module`."""
    out: NamedPieces = []
    for name, shape, start, local in owned_ranges(ds, module, key):
        meta = TensorMeta(FP32, shape)
        if local is None or local.numel() == 0:
            out.append((name, Pieces(meta)))  # names the tensor, so a tensor nobody hashed is noticed
        else:
            out.append((name, flat_pieces(meta, start, local.detach().to("cpu", torch.float32))))
    if buffers:
        rank, world = dist.get_rank(), dist.get_world_size()
        for i, (name, buf) in enumerate(sorted(persistent_buffer_items(module))):
            if i % world == rank:
                out.append((name, box_pieces(meta_of(buf), (0,) * buf.dim(), buf.detach().cpu())))
    return out


def zero_digests(
    ds: ModuleType, module: nn.Module, key: str | None = None, buffers: bool = True
) -> dict[str, str]:
    """TENSOR_SCHEME digest of every parameter's fp32 master (or AdamW moment `key`), identical on every rank.
    Collective."""
    return gather_combine(local_pieces(ds, module, key, buffers))
