"""Per-rank GPU memory and FLOPs of a run config's layout, computed from the config alone (pure).

What the native engine holds on one GPU (FSDP2, optional expert parallelism; mixed precision as
training/parallel.py sets it up):
  parameters  fp32 master weights, sharded over the data-parallel ranks (experts: E/ep per rank, FSDP over
              the rest of their group, so also 1/dp of them); DDP and one process hold them whole
  gradients   fp32, sharded like the parameters (FSDP2 reduce-scatters in fp32)
  optimizer   AdamW's two fp32 moments, sharded like the parameters
  gathered    FSDP2's unsharded working set in the compute dtype: the root module (embedding, final norm,
              LM head) kept gathered, two transformer blocks (the one computing and the one prefetched; a
              block's routed experts only E/ep of them) and one block's fp32 gradients before reduce-scatter
  activations per micro-batch of `train.micro_batch_size` x `data.seq_len` tokens, flash attention (no score
              matrix): each block's saved tensors (inputs of the norms and projections, q/k/v, attention
              output, router scores, the top-k dispatched tokens and expert intermediates, all-to-all
              buffers); with activation checkpointing only each block's input plus one block recomputed
  logits      the LM head output in the compute dtype, its fp32 copy for the loss and that copy's gradient
The plan is an estimate for choosing a layout (allocator fragmentation, NCCL buffers and the CUDA context
are the `HEADROOM` share of the GPU left unplanned); `kmoe train` refuses a layout that does not fit,
naming the key, before any compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kmoe.configtree import ConfigError
from model.params import human, human_bytes, model_size

from .dims import native_strategy, parallel_sizes

if TYPE_CHECKING:
    from .config import RunConfig

GIB = 1 << 30
HEADROOM = 0.10  # of each GPU's memory, kept for the CUDA context, NCCL buffers and fragmentation
ASSUMED_MFU = 0.40  # for the step-time figure only


@dataclass
class MemoryPlan:
    world: int
    dp: int
    ep: int
    strategy: str
    params: float
    grads: float
    optimizer: float
    gathered: float
    activations: float
    logits: float
    gpu_bytes: float  # 0: no GPU memory set (CPU ranks)
    flops_per_step: float  # model FLOPs (6N-style) of one optimizer step, all ranks
    hw_flops_per_step: float  # plus the forward recomputed under activation checkpointing
    tokens_per_step: int
    peak_flops: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations + self.logits

    @property
    def usable(self) -> float:
        return self.gpu_bytes * (1 - HEADROOM)

    def fits(self) -> bool:
        return self.gpu_bytes <= 0 or self.total <= self.usable


def _block_params(cfg: RunConfig, ep: int) -> tuple[float, float]:
    """(parameters of the largest transformer block as one rank gathers it, of the root module)."""
    m = cfg.model
    d, hd = m.hidden_size, m.dim_head
    attn = d * hd * (2 * m.num_heads + 2 * m.num_kv_heads) + 2 * d + (2 * hd if m.qk_norm else 0)
    expert = 3 * d * m.expert_intermediate_size
    moe = m.num_experts * expert / ep + m.num_shared_experts * expert + m.num_experts * d + m.num_experts
    dense = 3 * d * m.dense_intermediate_size
    block = attn + (moe if m.num_moe_layers else 0)
    if m.first_k_dense:
        block = max(block, attn + dense)
    root = m.vocab_size * d * (1 if m.tie_embeddings else 2) + d
    return block, root


def _activations(cfg: RunConfig, cbytes: int, ep: int) -> tuple[float, float]:
    """(activation bytes of one micro-batch through all blocks, logits bytes)."""
    m, t = cfg.model, cfg.train
    tok = t.micro_batch_size * cfg.data.seq_len
    d, hd = m.hidden_size, m.dim_head
    attn = 4 * d + hd * (m.num_heads + 2 * m.num_kv_heads)
    k, f = m.num_experts_per_tok, m.expert_intermediate_size
    moe = 2 * d + k * (d + 3 * f) + m.num_shared_experts * (d + 3 * f) + (2 * k * d if ep > 1 else 0)
    dense = 3 * d + 3 * m.dense_intermediate_size
    moe_layer = tok * ((attn + moe) * cbytes + 4 * m.num_experts)
    dense_layer = tok * (attn + dense) * cbytes
    layers = [dense_layer] * m.first_k_dense + [moe_layer] * m.num_moe_layers
    if t.activation_checkpointing:
        acts = len(layers) * tok * d * cbytes + max(layers)
    else:
        acts = float(sum(layers))
    return acts, tok * m.vocab_size * (cbytes + 8)


def memory_plan(cfg: RunConfig, world: int) -> MemoryPlan:
    """The per-rank plan of `cfg` on `world` ranks (the native engine's layouts; other engines plan their own)."""
    sz = parallel_sizes(cfg, world)
    strategy = native_strategy(cfg, world) if cfg.engine.name == "native" else cfg.engine.name
    size = model_size(cfg.model, cfg.data.seq_len)
    shard = sz.dp if strategy == "fsdp" else 1  # DDP and one process hold whole copies
    cbytes = 2 if cfg.train.precision == "bf16" else 4
    block, root = _block_params(cfg, sz.ep)
    gathered = (root + 2 * block) * cbytes + 4 * block if shard > 1 else 0.0
    acts, logits = _activations(cfg, cbytes, sz.ep)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    flops = size.flops_train_per_token * tokens
    hw = flops + (size.flops_fwd_per_token * tokens if cfg.train.activation_checkpointing else 0.0)
    return MemoryPlan(world=world, dp=sz.dp, ep=sz.ep, strategy=strategy, params=4 * size.total / shard,
                      grads=4 * size.total / shard, optimizer=8 * size.total / shard, gathered=gathered,
                      activations=acts, logits=logits, gpu_bytes=cfg.launch.gpu_memory_gib * GIB if
                      cfg.launch.gpus_per_node else 0.0, flops_per_step=flops, hw_flops_per_step=hw,
                      tokens_per_step=tokens, peak_flops=cfg.log.peak_flops)  # fmt: skip


def check_fits(cfg: RunConfig, world: int) -> MemoryPlan:
    """The plan, or ConfigError naming `launch.gpu_memory_gib` when a rank's share does not fit a GPU."""
    plan = memory_plan(cfg, world)
    if plan.fits():
        return plan
    need = plan.total / (1 - HEADROOM) / GIB
    raise ConfigError(
        f"launch.gpu_memory_gib: {cfg.launch.gpu_memory_gib} GiB per GPU cannot hold this layout: each of the "
        f"{world} ranks needs {plan.total / GIB:.1f} GiB ({_parts(plan)}) plus {HEADROOM:.0%} headroom "
        f"({need:.0f} GiB); use more GPUs (launch.nodes), a smaller train.micro_batch_size, "
        "train.activation_checkpointing or parallel.expert_parallel"
    )


def _parts(plan: MemoryPlan) -> str:
    names = ("params", "grads", "optimizer", "gathered", "activations", "logits")
    return ", ".join(f"{n} {getattr(plan, n) / GIB:.1f}" for n in names)


def format_plan(plan: MemoryPlan) -> str:
    how = f"fp32, 1/{plan.dp} each" if plan.strategy == "fsdp" else "fp32, whole"
    rows = [
        (f"parameters ({how})", plan.params),
        (f"gradients ({how})", plan.grads),
        (f"optimizer m, v ({how})", plan.optimizer),
        ("gathered params/grads (FSDP)", plan.gathered),
        ("activations (micro-batch)", plan.activations),
        ("logits + loss", plan.logits),
        ("total per rank", plan.total),
    ]
    lines = [f"memory plan per rank ({plan.strategy}, {plan.world} ranks, dp {plan.dp}, ep {plan.ep}):"]
    lines += [f"  {name:<34}{human_bytes(b):>12}" for name, b in rows]
    if plan.gpu_bytes:
        verdict = "fits" if plan.fits() else "DOES NOT FIT"
        lines.append(f"  GPU memory {human_bytes(plan.gpu_bytes)}, {human_bytes(plan.usable)} usable "
                     f"({HEADROOM:.0%} headroom): {verdict}, {plan.total / plan.usable:.0%} used")  # fmt: skip
    else:
        lines.append("  no GPU memory to check (CPU ranks: launch.gpus_per_node is 0)")
    recompute = " with the recomputed forward" if plan.hw_flops_per_step > plan.flops_per_step else ""
    lines.append(f"  FLOPs per step {plan.flops_per_step:.3g} ({human(plan.tokens_per_step)} tokens), "
                 f"{plan.hw_flops_per_step / plan.world:.3g} per rank{recompute}")  # fmt: skip
    if plan.peak_flops > 0:
        secs = plan.hw_flops_per_step / (plan.world * plan.peak_flops * ASSUMED_MFU)
        lines.append(
            f"  step time at {ASSUMED_MFU:.0%} MFU of {plan.peak_flops:.3g} FLOP/s per GPU: {secs:.1f} s"
        )
    return "\n".join(lines)
