"""Layout-independent tensor digests of a sharded state, computed where the shards are (kmoe.hashing).

Each rank hashes the block it holds of every tensor (a DTensor's local shard, placed by its mesh coordinate;
a plain tensor that every rank holds whole is hashed by one rank, chosen round-robin), sends the resulting
tree nodes (32 bytes each, plus the few elements of any cut leaf) to rank 0, which combines them into one
digest per tensor and broadcasts the digests. No tensor is gathered; the digest equals
`kmoe.hashing.layout_digest` of the full tensor whatever the layout (FSDP2 Shard(0), EP Shard(0) on the expert
dim, a 2-D mesh with both, Shard(1), Replicate).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from kmoe.hashing import DigestError, Pieces, TensorMeta, box_pieces, combine_pieces, meta_of

NamedPieces = list[tuple[str, Pieces]]


def dtensor_blocks(t: Any) -> list[tuple[tuple[int, ...], torch.Tensor]] | None:
    """(global offsets, block) of every box of DTensor `t` this rank holds, or None when another replica (a
    rank with a lower coordinate on a Replicate mesh dim) holds the same data and hashes it.

    Shard and _StridedShard placements (FSDP2 over an expert-parallel or tensor-parallel shard) are followed
    mesh dim by mesh dim to the global index of every local row, as DTensor itself places them; a local
    tensor whose rows are not consecutive in some dim is cut into the boxes where they are."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _get_shard_size_and_offsets
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh, coord = t.device_mesh, t.device_mesh.get_coordinate()
    if coord is None:  # this rank is not in the tensor's mesh
        return None
    index: dict[int, torch.Tensor] = {}
    for dim, p in enumerate(t.placements):
        if type(p) is Replicate:
            if coord[dim] != 0:
                return None
        elif isinstance(p, Shard | _StridedShard):
            cur = index.get(p.dim)
            size = t.shape[p.dim] if cur is None else len(cur)
            _, idx = _get_shard_size_and_offsets(
                size, mesh.size(dim), coord[dim], p, cur, t.shape[p.dim], False
            )
            index[p.dim] = idx[:0] if _ == 0 else idx
        else:
            raise DigestError(f"placement {p} on mesh dim {dim}: digests need Shard(d) or Replicate placements "
                              "(redistribute a Partial tensor first)")  # fmt: skip
    local = t.to_local()
    runs = [_runs(index[d].tolist()) if d in index else [(0, 0, n)] for d, n in enumerate(t.shape)]
    if tuple(local.shape) != tuple(sum(r[2] for r in rr) for rr in runs):
        raise DigestError(f"local shard {tuple(local.shape)} is not the block its placements imply")
    if all(len(rr) == 1 for rr in runs):
        return [(tuple(r[0][1] for r in runs), local)]
    return [
        (tuple(g for _, g, _ in box), local[tuple(slice(k, k + n) for k, _, n in box)].contiguous())
        for box in itertools.product(*runs)
    ]


def _runs(indices: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive global indices: (first local position, first global index, length)."""
    out: list[tuple[int, int, int]] = []
    for k, g in enumerate(indices):
        if out and out[-1][1] + out[-1][2] == g:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((k, g, 1))
    return out


def local_pieces(state: Mapping[str, Any], rank: int = 0, world: int = 1) -> NamedPieces:
    """This rank's pieces of every tensor in `state` (DTensors or plain tensors every rank holds whole)."""
    from torch.distributed.tensor import DTensor

    out: NamedPieces = []
    for i, (name, t) in enumerate(sorted(state.items())):
        if isinstance(t, DTensor):
            meta = TensorMeta(str(t.dtype).removeprefix("torch."), tuple(int(n) for n in t.shape))
            blocks = dtensor_blocks(t)
            if not blocks:
                out.append((name, Pieces(meta)))  # names the tensor, so a tensor held nowhere is noticed
            for offsets, local in blocks or []:
                out.append((name, box_pieces(meta, offsets, local.detach().cpu())))
        elif i % world == rank:
            out.append((name, box_pieces(meta_of(t), (0,) * t.dim(), t.detach().cpu())))
    return out


def combine_named(all_pieces: Iterable[NamedPieces]) -> dict[str, str]:
    """Digest per tensor name from the pieces of every rank. Errors name the tensor."""
    by_name: dict[str, list[Pieces]] = {}
    for named in all_pieces:
        for name, p in named:
            by_name.setdefault(name, []).append(p)
    out = {}
    for name in sorted(by_name):
        try:
            out[name] = combine_pieces(by_name[name])
        except DigestError as e:
            raise DigestError(f"tensor '{name}': {e}") from None
    return out


def sharded_digests(state: Mapping[str, Any], group: Any = None) -> dict[str, str]:
    """TENSOR_SCHEME digest of every tensor of a (possibly sharded) state, identical on every rank.

    Collective over `group` (default: the world) when torch.distributed is initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return combine_named([local_pieces(state)])
    return gather_combine(local_pieces(state, dist.get_rank(group), dist.get_world_size(group)), group)


def gather_combine(mine: NamedPieces, group: Any = None) -> dict[str, str]:
    """Digests from every rank's pieces (`mine` here): gathered to the group's first rank as hashes, combined,
    broadcast. Collective over `group` (default: the world); on one process, just `mine`."""
    if not (dist.is_available() and dist.is_initialized()):
        return combine_named([mine])
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    gathered: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object(mine, gathered if rank == 0 else None, dst=dist.get_global_rank(group, 0) if group else 0,
                       group=group)  # fmt: skip
    result: list[Any] = [None]
    if rank == 0:
        try:
            result = [combine_named(gathered)]
        except DigestError as e:
            result = [e]
    dist.broadcast_object_list(result, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]
