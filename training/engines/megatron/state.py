"""The megatron engine's state in kmoe's own names and layout: full weights and AdamW moments, and digests.

A rank holds slices of kmoe tensors twice over: its model stage is TP/EP/PP-cut (shard.kmoe_blocks says
where each piece sits), and the distributed optimizer keeps each local parameter's fp32 main copy and
moments as a flat range over the data-parallel ranks. `full_state` puts both back together in the format
the native engine's `state_dict` returns (so checkpoints, export and the audit tools read either engine's
run, and either engine resumes the other's checkpoint); `load_full_state` cuts a full state back into this
rank's pieces. `param_digests` is the layout-independent digest (kmoe-merkle/1): each rank hashes the blocks of
kmoe tensors it holds and only hashes travel, so the digests of a megatron run at any TP/EP/PP equal the
native engine's for the same weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from kmoe.hashing import DigestError, TensorMeta, box_pieces
from model.transformer import MoETransformer

from ... import optim
from ...digests import gather_combine
from .convert import ConversionError, expected_shapes, to_megatron
from .shard import kmoe_blocks, local_state_from_full

MOMENTS = ("exp_avg", "exp_avg_sq")


def _dist_optimizers(optimizer) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _owned_ranges(opt) -> Iterable[tuple[torch.nn.Parameter, int, int]]:
    """(model param, start, end) of the flat range of each local parameter this DP rank updates."""
    for gbuf in opt.gbuf_ranges:
        for buckets in gbuf.values():
            for bucket in buckets:
                for param, ranges in bucket["param_map"].items():
                    yield param, ranges["param"].start, ranges["param"].end


def _main_state(opt, param) -> tuple[torch.Tensor, dict]:
    """The fp32 main shard of `param` and its AdamW state dict (empty before the first step)."""
    gi, go = opt.model_param_group_index_map[param]
    main = opt.optimizer.param_groups[gi]["params"][go]
    return main, opt.optimizer.state[main]


def _local_param_state(
    built, moments: bool = True
) -> tuple[dict[str, dict[str, torch.Tensor]], float | None]:
    """{local param name: {"param", "exp_avg", "exp_avg_sq"} as whole local tensors}, and the Adam step.

    Each data-parallel group gathers the ranges of its members (dense and expert parameters have different
    groups); moments are absent before the first step.
    """
    names = {p: n for n, p in built.model.module.named_parameters()}
    out: dict[str, dict[str, torch.Tensor]] = {}
    step = None
    for opt in _dist_optimizers(built.optimizer):
        mine = {}
        for param, start, end in _owned_ranges(opt):
            main, st = _main_state(opt, param)
            if "step" in st:
                step = float(st["step"])
            # clone: a shard is a view into the whole DDP buffer, and pickling a view sends its whole storage
            pieces = {"param": main.detach().float().cpu().clone()}
            if moments:
                pieces.update({k: st[k].detach().float().cpu().clone() for k in MOMENTS if k in st})
            mine[names[param]] = (start, end, tuple(param.shape), pieces)
        group = opt.data_parallel_group
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, mine, group=group)
        for part in gathered:
            for name, (start, end, shape, pieces) in part.items():
                slot = out.setdefault(name, {k: torch.zeros(shape).flatten() for k in pieces})
                for k, v in pieces.items():
                    slot.setdefault(k, torch.zeros(slot["param"].numel()))[start:end] = v
    out = {n: {k: v.view(_shape_of(built, n)) for k, v in d.items()} for n, d in out.items()}
    steps = [step] if step is not None else []
    all_steps: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(all_steps, steps)
    found = {s for ss in all_steps for s in ss}
    return out, (found.pop() if found else None)


def _shape_of(built, name: str) -> torch.Size:
    return dict(built.model.module.named_parameters())[name].shape


def _holds(name: str) -> bool:
    """Whether this rank sends its copy of megatron tensor `name` (one data-parallel replica does)."""
    from megatron.core import parallel_state as ps

    from .convert import EXPERT_NAME

    if EXPERT_NAME.search(name):
        return ps.get_expert_data_parallel_rank() == 0
    return ps.get_data_parallel_rank(with_context_parallel=True) == 0


def _blocks(cfg, built, state: dict[str, torch.Tensor]):
    held = {n: t for n, t in state.items() if _holds(built.place.global_name(n) or n)}
    blocks = kmoe_blocks(cfg.model, held, built.place)
    return [(name, off, blk.detach().float().cpu().clone()) for name, off, blk in blocks]  # own storage each


def _assemble(blocks, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Every rank's blocks put together into whole tensors on every rank; an element that no rank holds is an
    error naming the tensor."""
    got: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(got, blocks)
    full: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    for name, off, blk in (b for part in got for b in part):
        t = full.setdefault(name, torch.zeros(shapes[name]))
        cov = seen.setdefault(name, torch.zeros(shapes[name], dtype=torch.bool))
        index = tuple(slice(o, o + n) for o, n in zip(off, blk.shape, strict=True))
        t[index], cov[index] = blk, True
    for name, cov in seen.items():
        if not bool(cov.all()):
            raise ConversionError(f"tensor '{name}': {int((~cov).sum())} elements held by no rank")
    return full


def _weights(built, local: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """This rank's weights by local name: the fp32 main copies of the parameters, and the router biases."""
    weights = {n: d["param"] for n, d in local.items()}
    weights.update({n: b for n, b in built.model.module.state_dict().items() if n.endswith("expert_bias")})
    return weights


def _param_groups(cfg) -> list[dict]:
    """The native engine's AdamW param groups (training/optim.py), with kmoe parameter names."""
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    opt = optim.build_optimizer(model, cfg.train)
    names = {id(p): n for n, p in model.named_parameters()}
    # the state dict numbers parameters in optimizer order (group by group), not in the model's order
    return [
        {**saved, "params": [names[id(p)] for p in live["params"]]}
        for saved, live in zip(opt.state_dict()["param_groups"], opt.param_groups, strict=True)
    ]


def full_state(cfg, built) -> dict[str, Any]:
    """{"model": kmoe state, "optimizer": native AdamW format}, whole on every rank (collective).

    Every rank returns every tensor: the trainer's sharded checkpoint (training/checkpoint.py) writes each once
    (DCP deduplicates replicated tensors) and, on load, fills in place exactly the keys this returns, so before
    the first step the AdamW slots are zeros at step 0 (what the first step would start from) rather than
    absent. At scale megatron's own dist_checkpointing (dist_ckpt.py) avoids the whole copies."""
    shapes = expected_shapes(cfg.model)
    local, step = _local_param_state(built)
    weights = _weights(built, local)
    model = dict(sorted(_assemble(_blocks(cfg, built, weights), shapes).items()))
    moments = {}
    for key in MOMENTS if step is not None else ():
        moments[key] = _assemble(_blocks(cfg, built, {n: d[key] for n, d in local.items()}), shapes)
    if step is None:  # no step yet: AdamW's starting state, so a checkpoint's slots have somewhere to load
        params = {n for n in model if not n.endswith("expert_bias")}
        moments = {key: {n: torch.zeros_like(model[n]) for n in params} for key in MOMENTS}
        step = 0.0
    opt_state = {
        n: {"step": torch.tensor(step), **{k: moments[k][n] for k in MOMENTS}}
        for n in moments.get("exp_avg", {})
    }
    return {"model": model, "optimizer": {"state": opt_state, "param_groups": _param_groups(cfg)}}


@torch.no_grad()
def load_full_state(cfg, built, full: dict[str, Any]) -> None:
    """Load a full kmoe state (either engine's) into this rank's model stage and optimizer shards."""
    m = cfg.model
    weights = to_megatron(m, {k: v.float() for k, v in full["model"].items()})
    module = built.model.module
    local = local_state_from_full(module, weights, built.place)
    missing, unexpected = module.load_state_dict(local, strict=False)
    if [k for k in missing if not k.endswith("_extra_state")] or unexpected:
        raise ConversionError(
            f"state does not fit this rank's model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    opt_state = full["optimizer"].get("state", {})
    moments = {}
    if opt_state:
        for key in MOMENTS:
            per_name = {n: s[key].float() for n, s in opt_state.items()}
            per_name.update({n: torch.zeros_like(t) for n, t in full["model"].items() if n not in per_name})
            moments[key] = local_state_from_full(module, to_megatron(m, per_name), built.place)
        steps = {float(s["step"]) for s in opt_state.values()}
        if len(steps) != 1:
            raise ConversionError(f"optimizer state has parameters at different steps {sorted(steps)}")
    names = {p: n for n, p in module.named_parameters()}
    for opt in _dist_optimizers(built.optimizer):
        for param, start, end in _owned_ranges(opt):
            main, st = _main_state(opt, param)
            name = names[param]
            main.copy_(local[name].flatten()[start:end].to(main.dtype))
            if not moments:
                st.clear()
                continue
            st["step"] = torch.tensor(next(iter(steps)), dtype=torch.float32)
            for key in MOMENTS:
                st[key] = moments[key][name].flatten()[start:end].to(main.dtype).clone()


def param_digests(cfg, built) -> dict[str, str]:
    """Layout-independent digests (kmoe.hashing.TENSOR_SCHEME) of the weights by kmoe name, on every rank.

    Each rank hashes the blocks of kmoe tensors it holds (one data-parallel replica does) and sends only
    hashes; no tensor leaves its rank. fp32 runs hash the model's own tensors; bf16 runs their fp32 masters,
    which the distributed optimizer keeps as data-parallel ranges (gathered within each DP group).
    """
    if cfg.train.precision == "bf16":
        weights = _weights(built, _local_param_state(built, moments=False)[0])
    else:
        weights = {n: t for n, t in built.model.module.state_dict().items() if torch.is_tensor(t)}
    shapes = expected_shapes(cfg.model)
    mine = [
        (name, box_pieces(TensorMeta("float32", shapes[name]), off, blk.detach().float().cpu()))
        for name, off, blk in _blocks(cfg, built, weights)
    ]
    digests = gather_combine(mine)
    missing = sorted(set(shapes) - set(digests))
    if missing:
        raise DigestError(f"tensor '{missing[0]}' is held by no rank ({len(missing)} missing)")
    return digests
