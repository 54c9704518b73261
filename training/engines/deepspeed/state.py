"""Full tensors of a ZeRO-partitioned model and optimizer, one tensor at a time, through DeepSpeed's tensor
fragment API (`deepspeed.utils.safe_*`), so the full state never sits on one rank all at once.

The values are ZeRO's fp32 master weights and AdamW moments, by kmoe tensor name; the optimizer state has
the layout the native engine's full optimizer state dict has (`{"state": {name: {step, exp_avg,
exp_avg_sq}}, "param_groups": [{..., "params": [names]}]}`), so a state moves between engines.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def materialise_adam_state(opt: torch.optim.Optimizer, zero_opt: Any) -> None:
    """Create AdamW's zero moments and step on ZeRO's flat fp32 partitions now, as its first `step` would.

    torch's AdamW creates its state lazily; DeepSpeed's per-tensor state access (and loading a state before
    the first step) needs it to exist. The values are the ones the first step would start from, so training
    is unchanged. ZeRO-1/2 leave their partitions in the optimizer's groups; ZeRO-3 puts each sub-group's
    partition there only while it steps it.
    """
    flats = getattr(zero_opt, "fp32_partitioned_groups_flat", None)
    if flats is None:
        flats = [p for group in opt.param_groups for p in group["params"]]
    for p in flats:
        if not opt.state.get(p):
            opt.state[p] = {
                "step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


def link_optimizer_state(zero_opt: Any) -> None:
    """Point ZeRO-1/2's per-parameter fragments at the (materialised) optimizer state. DeepSpeed does this on
    its first step; ZeRO-3 reads the optimizer state directly and needs nothing."""
    lazy = getattr(zero_opt, "_lazy_init_hp_params_optimizer_state", None)
    if lazy is not None:
        lazy()


def adam_step(opt: torch.optim.Optimizer) -> torch.Tensor:
    """The AdamW step count (every ZeRO flat partition steps together)."""
    for state in opt.state.values():
        if "step" in state:
            return state["step"].detach().clone().cpu()
    return torch.tensor(0.0)


def set_adam_step(opt: torch.optim.Optimizer, step: torch.Tensor) -> None:
    for state in opt.state.values():
        state["step"].copy_(step.to(state["step"].dtype))


def full_tensors(ds: ModuleType, module: nn.Module, key: str | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 tensor on the CPU) of every parameter: the master weight (`key` None) or an AdamW
    moment. Collective: every rank runs it and gets each tensor in turn."""
    for name, p in module.named_parameters():
        if key is None:
            full = ds.utils.safe_get_full_fp32_param(p)
        else:
            full = ds.utils.safe_get_full_optimizer_state(p, key)
        yield name, full.detach().to("cpu", copy=True)


def group_records(opt: torch.optim.Optimizer, module: nn.Module) -> list[dict[str, Any]]:
    """kmoe's param groups (optim.param_groups: decay, no_decay) as a state dict records them, parameters by
    name; hyper-parameters from the optimizer (ZeRO-3 regroups its flat partitions, never mixing groups)."""
    from ... import optim

    names = {id(p): n for n, p in module.named_parameters()}
    current = {g.get("name"): g for g in opt.param_groups}
    records = []
    for g in optim.param_groups(module, 0.0):
        live = current[g["name"]]
        settings = {k: v for k, v in live.items() if k != "params"}
        records.append({**settings, "params": [names[id(p)] for p in g["params"]]})
    return records


def gathered_state(
    ds: ModuleType, module: nn.Module, opt: torch.optim.Optimizer, keep: bool
) -> dict[str, Any]:
    """{"model", "optimizer"} full state; tensors are kept only where `keep` (rank 0)."""
    model: dict[str, torch.Tensor] = {}
    for name, t in full_tensors(ds, module, None):
        if keep:
            model[name] = t
    for name, buf in persistent_buffer_items(module):
        if keep:
            model[name] = buf.detach().to("cpu", copy=True)
    state: dict[str, dict[str, torch.Tensor]] = {}
    step = adam_step(opt)
    for key in ADAM_KEYS:
        for name, t in full_tensors(ds, module, key):
            if keep:
                state.setdefault(name, {"step": step.clone()})[key] = t
    return {"model": model, "optimizer": {"state": state, "param_groups": group_records(opt, module)}}


def persistent_buffer_items(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) of the buffers a state dict holds (the router's expert bias): ZeRO never partitions them."""
    params = {n for n, _ in module.named_parameters()}
    return [(n, t) for n, t in module.state_dict(keep_vars=True).items() if n not in params]


@torch.no_grad()
def load_full_state(ds: ModuleType, module: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
                    partitioned: bool) -> None:  # fmt: skip
    """Set weights (ZeRO's fp32 masters and the module's own copy), buffers and AdamW state from a full state."""
    model, ostate = state["model"], state["optimizer"]["state"]
    missing = sorted({n for n, _ in module.named_parameters()} - set(model))
    if missing:
        raise ValueError(f"state has no tensor for parameter(s) {missing[:5]} (not a state of this model)")
    for name, p in module.named_parameters():
        value = model[name].to(torch.float32)
        ds.utils.safe_set_full_fp32_param(p, value.to(p.device))
        with ds.zero.GatheredParameters([p], modifier_rank=0, enabled=partitioned):
            if not partitioned or dist.get_rank() == 0:
                p.copy_(value.to(p.device, p.dtype))
        for key in ADAM_KEYS:
            if name in ostate and key in ostate[name]:
                ds.utils.safe_set_full_optimizer_state(
                    p, ostate[name][key].to(torch.float32).to(p.device), key
                )
    for name, buf in persistent_buffer_items(module):
        buf.copy_(model[name].to(buf.device, buf.dtype))
    steps = [s["step"] for s in ostate.values() if "step" in s]
    if steps:
        set_adam_step(opt, torch.as_tensor(steps[0]))
    _load_group_settings(opt, state["optimizer"].get("param_groups", []))


def _load_group_settings(opt: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """Hyper-parameters of the saved param groups (matched by group name); the lr is set every step anyway."""
    saved = {g.get("name"): g for g in groups}
    for g in opt.param_groups:
        for key in ("betas", "eps", "weight_decay"):
            if g.get("name") in saved and key in saved[g["name"]]:
                value = saved[g["name"]][key]
                g[key] = tuple(value) if key == "betas" else value
