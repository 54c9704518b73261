"""Per-rank memory of a deepspeed-engine run, from the config alone (pure; `kmoe train --dry-run` prints it).

Counted per tensor of kmoe's model (built on the meta device, so nothing is allocated) with the rules DeepSpeed
applies: ZeRO-1 partitions the optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the parameters, except
those below `stage3_param_persistence_threshold` that every rank keeps whole. Under ZeRO-3 each transformer
block is a leaf module (runtime.py says why): its attention and all its experts are gathered at once, so the
largest block is counted whole on top of the shards (and its gradients, produced whole in backward before they
are reduce-scattered), with the prefetch bucket. Offload moves the optimizer state (and its fp32 gradient
partition), and under ZeRO-3 the parameter shards, to host memory. Activations are not counted here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .settings import BUCKETS

if TYPE_CHECKING:
    from ...config import RunConfig

ADAM_BYTES = 12  # fp32 master weight + exp_avg + exp_avg_sq per element (ZeRO keeps its own fp32 copy)
GRAD_BYTES = 4  # gradients are accumulated and reduced in fp32


@dataclass
class MemoryPlan:
    stage: int
    dp: int
    device: dict[str, int] = field(default_factory=dict)  # item -> bytes per rank on the accelerator
    host: dict[str, int] = field(default_factory=dict)  # item -> bytes per rank in host memory (offload)
    notes: list[str] = field(default_factory=list)

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


def param_shapes(cfg: RunConfig) -> dict[str, int]:
    """numel of every parameter of kmoe's model, by name (built on the meta device)."""
    import torch

    from model import MoETransformer

    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    return {n: p.numel() for n, p in model.named_parameters()}


def block_numels(shapes: dict[str, int]) -> dict[str, int]:
    """Elements of each transformer block (attention, norms, MoE or dense MLP): ZeRO-3's leaf, gathered whole."""
    out: dict[str, int] = {}
    for name, n in shapes.items():
        if name.startswith("layers."):
            block = ".".join(name.split(".")[:2])
            out[block] = out.get(block, 0) + n
    return out


def zero_memory_plan(cfg: RunConfig, world: int, shapes: dict[str, int] | None = None) -> MemoryPlan:
    """What each of `world` data-parallel ranks holds under the configured ZeRO stage and offload."""
    e = cfg.engine
    shapes = shapes if shapes is not None else param_shapes(cfg)
    total, dp = sum(shapes.values()), world
    pb = 2 if cfg.train.precision == "bf16" else 4
    plan = MemoryPlan(e.zero_stage, dp)
    dev, host = plan.device, plan.host
    shard = math.ceil(total / dp)
    if e.zero_stage < 3:
        dev["parameters (whole)"] = total * pb
    else:
        small = sum(n for n in shapes.values() if n < BUCKETS["stage3_param_persistence_threshold"])
        part = sum(
            math.ceil(n / dp) for n in shapes.values() if n >= BUCKETS["stage3_param_persistence_threshold"]
        )
        (host if e.offload_params == "cpu" else dev)[f"parameters (1/{dp} shards)"] = part * pb
        dev["parameters kept whole (small)"] = small * pb
        leaves = block_numels(shapes)
        biggest = max(leaves.values(), default=0)
        dev["gathered leaf block (attention + all experts)"] = biggest * pb
        dev["its gradients before reduce-scatter"] = biggest * pb
        dev["prefetch bucket"] = min(BUCKETS["stage3_prefetch_bucket_size"], total) * pb
        plan.notes.append(
            f"largest transformer block gathered whole: {biggest:,} elements (of {len(leaves)} blocks)"
        )
    grads = total if e.zero_stage == 1 else shard
    bucket = min(BUCKETS["reduce_bucket_size"], total) * GRAD_BYTES
    label = "gradients (whole)" if e.zero_stage == 1 else f"gradients (1/{dp} shards)"
    if e.offload_optimizer == "cpu":
        host["optimizer: fp32 master + AdamW moments"] = shard * ADAM_BYTES
        host["fp32 gradient partition"] = shard * GRAD_BYTES
        if e.zero_stage == 1:
            dev[label] = grads * GRAD_BYTES
    else:
        dev[f"optimizer: fp32 master + AdamW moments (1/{dp})"] = shard * ADAM_BYTES
        dev[label] = grads * GRAD_BYTES
    dev["gradient reduce bucket"] = bucket
    return plan


def plan_lines(plan: MemoryPlan) -> list[str]:
    """The plan as a user reads it in the dry run."""
    from model.params import human_bytes

    lines = [
        f"deepspeed ZeRO-{plan.stage} memory per rank ({plan.dp} data-parallel ranks; activations not counted):"
    ]
    for item, n in plan.device.items():
        lines.append(f"  device  {item:<48} {human_bytes(n):>12}")
    for item, n in plan.host.items():
        lines.append(f"  host    {item:<48} {human_bytes(n):>12}")
    lines.append(
        f"  total   device {human_bytes(plan.device_total)}, host (offload) {human_bytes(plan.host_total)}"
    )
    lines += [f"  note    {n}" for n in plan.notes]
    return lines
