"""Where this rank's megatron tensors sit in the whole model: names, pipeline/expert offsets, TP slices.

A rank's GPTModel names its layers from 0 within its pipeline stage and its experts from 0 within its
expert-parallel group; `RankPlace` turns those into the global names of `convert.py` (layer + stage offset,
expert + `ep_rank * E/EP`). Tensor parallelism splits one dimension in `tp` equal, contiguous pieces; the
fused gate|up `linear_fc1` is split per half, so a rank holds [gate_r; up_r]. Experts are split by the
expert tensor-parallel size `etp` (1 under expert parallelism, else the TP size: spec.Layout.etp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .convert import EXPERT_NAME, ConversionError, canonical_name, conversion_map, globalize


@dataclass(frozen=True)
class RankPlace:
    tp_rank: int
    tp: int
    layer_offset: int
    expert_offset: int
    etp_rank: int = 0
    etp: int = 1

    @classmethod
    def current(cls, config) -> RankPlace:
        """This process's place, from megatron's parallel state and the model's TransformerConfig."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        ep_rank = ps.get_expert_model_parallel_rank()
        local = config.num_moe_experts // ps.get_expert_model_parallel_world_size()
        return cls(
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp=ps.get_tensor_model_parallel_world_size(),
            layer_offset=get_transformer_layer_offset(config),
            expert_offset=ep_rank * local,
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp=ps.get_expert_tensor_parallel_world_size(),
        )

    def split_of(self, name: str) -> tuple[int, int]:
        """(rank, size) of the tensor-parallel split that applies to megatron tensor `name`."""
        return (self.etp_rank, self.etp) if EXPERT_NAME.match(name) else (self.tp_rank, self.tp)

    def global_name(self, local_name: str) -> str | None:
        name = canonical_name(local_name)
        return None if name is None else globalize(name, self.layer_offset, self.expert_offset)


def tp_split_dim(name: str, full: tuple[int, ...], local: tuple[int, ...], tp: int) -> int | None:
    """The dimension TP splits for this tensor (None: replicated); errors if the shapes do not fit."""
    if full == local:
        return None
    diff = [d for d, (a, b) in enumerate(zip(full, local, strict=True)) if a != b]
    if len(full) != len(local) or len(diff) != 1 or full[diff[0]] != local[diff[0]] * tp:
        raise ConversionError(f"'{name}': local shape {list(local)} is not a 1/{tp} slice of {list(full)}")
    return diff[0]


def _is_glu_fc1(name: str) -> bool:
    return name.endswith("linear_fc1.weight")  # every MLP here is SwiGLU


def take_slice(name: str, full: torch.Tensor, local_shape, place: RankPlace) -> torch.Tensor:
    """This rank's piece of the full tensor `name`."""
    rank, size = place.split_of(name)
    dim = tp_split_dim(name, tuple(full.shape), tuple(local_shape), size)
    if dim is None:
        return full
    if _is_glu_fc1(name) and dim == 0:
        return torch.cat([h.chunk(size, 0)[rank] for h in full.chunk(2, 0)], 0)
    return full.chunk(size, dim)[rank]


def local_state_from_full(
    model: torch.nn.Module, full: dict[str, torch.Tensor], place: RankPlace
) -> dict[str, torch.Tensor]:
    """The state_dict this rank's model loads, cut from a full (one-rank, global-named) megatron state."""
    out = {}
    for local_name, ref in model.state_dict().items():
        name = place.global_name(local_name)
        if name is None:
            continue
        if name not in full:
            raise ConversionError(f"full state lacks '{name}' (this rank's '{local_name}')")
        out[local_name] = take_slice(name, full[name], ref.shape, place).to(ref.dtype).clone()
    return out


def kmoe_blocks(cfg, state: dict[str, torch.Tensor], place: RankPlace):
    """This rank's megatron tensors as blocks of kmoe tensors: (kmoe name, offsets, block), no gathering.

    `state` is the rank's own state_dict (local names). A TP shard of a fused tensor stays contiguous in
    kmoe's layout per piece (whole KV groups of q/k/v; a slice of gate and of up), a row-parallel shard is a
    column block, and local expert i is the block [expert_offset + i] of kmoe's stacked expert tensors.
    Layout-independent digests (kmoe.hashing) are computed over exactly these blocks.
    """
    from .convert import expected_shapes

    shapes = expected_shapes(cfg)
    named = {}
    for local_name, t in state.items():
        name = place.global_name(local_name)
        if name is not None and torch.is_tensor(t):
            named[name] = t
    if cfg.tie_embeddings:  # the last pipeline stage's copy of the shared embedding
        named.pop("output_layer.weight", None)
    seen = set()
    for entry in conversion_map(cfg):
        held = [n for n in entry.meg if n in named]
        if not held:
            continue  # another pipeline stage's (or expert group's) tensors
        seen.update(held)
        if entry.per_expert:
            for name in held:
                e = int(EXPERT_NAME.match(name).group(2))
                for ours, block_1XX in zip(entry.ours, entry.to_ours(named[name]), strict=True):
                    one = (1, *shapes[ours][1:])  # expert e alone, maybe split by expert TP
                    offsets = _tp_offsets(ours, one, tuple(block_1XX.shape), place.etp_rank, place.etp)
                    yield ours, (e, *offsets[1:]), block_1XX
            continue
        if len(held) != len(entry.meg):
            raise ConversionError(f"rank holds '{held[0]}' but not '{sorted(set(entry.meg) - set(held))[0]}'")
        for ours, block in zip(entry.ours, entry.to_ours(*(named[n] for n in entry.meg)), strict=True):
            yield ours, _tp_offsets(ours, shapes[ours], tuple(block.shape), place.tp_rank, place.tp), block
    unplaced = sorted(set(named) - seen)
    if unplaced:
        raise ConversionError(f"megatron tensor '{unplaced[0]}' has no place in the kmoe model")


def _tp_offsets(name: str, full: tuple, local: tuple, rank: int, size: int) -> tuple[int, ...]:
    """Where a TP rank's block starts in the full tensor (zeros when it holds the whole tensor)."""
    dim = tp_split_dim(name, full, local, size)
    offsets = [0] * len(full)
    if dim is not None:
        offsets[dim] = rank * local[dim]
    return tuple(offsets)
