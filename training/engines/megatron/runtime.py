"""megatron-core's training parts put together for kmoe: process groups, the GPTModel initialised with kmoe's
seeded weights, megatron's DDP and distributed optimizer with kmoe's optimizer settings.

Nothing here knows the trainer; engine.py adapts it to the engine contract.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from kmoe.configtree import ConfigError
from model.config import ModelConfig
from model.init import init_value

from . import spec
from .convert import conversion_map
from .shard import RankPlace, take_slice

log = logging.getLogger(__name__)

CPU_REDIRECT_MARKER = "__kmoe_cpu_redirect__"  # set on megatron.core by the test-only CPU redirect


def megatron_device() -> torch.device:
    """The device megatron runs on: this rank's GPU; the CPU only under the tests' CUDA redirect.

    megatron-core 0.16.1 hard-codes CUDA in its buffers, RNG tracker, dispatcher and optimizer, so a CPU
    run without the redirect would fail deep inside megatron; refuse it here instead.
    """
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    import megatron.core as mcore

    if getattr(mcore, CPU_REDIRECT_MARKER, None):
        return torch.device("cpu")
    raise ConfigError(
        "engine.name: megatron needs CUDA GPUs (megatron-core hard-codes CUDA); on a CPU machine use the "
        "native engine (the megatron tests run on CPU through tests/megatron_cpu.py)"
    )


def init_parallel(layout: spec.Layout, seed: int) -> None:
    """megatron's process groups for `layout` over the already initialised default group, and its RNGs."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    sizes = (layout.tp, layout.pp, layout.cp, layout.ep)
    if ps.model_parallel_is_initialized():
        now = (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_context_parallel_world_size(),
            ps.get_expert_model_parallel_world_size(),
        )
        if now != sizes:  # a second engine in this process (replay, tests) with another layout
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():  # engines of one layout share megatron's groups
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            context_parallel_size=layout.cp,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.etp,
        )
    model_parallel_cuda_manual_seed(seed)


def init_local_state(m: ModelConfig, model: torch.nn.Module, place: RankPlace, seed: int) -> dict[str, Any]:
    """This rank's tensors of kmoe's seeded initialisation (model/init.py), in megatron's layout.

    Each kmoe tensor this rank needs is drawn whole from its own seeded generator (so values never depend on
    the layout), converted, and cut to this rank's slice; tensors of other stages are never drawn.
    """
    local = {}
    for local_name, ref in model.state_dict().items():
        name = place.global_name(local_name)
        if name is not None and torch.is_tensor(ref):
            local[name] = (local_name, ref)
    if m.tie_embeddings:
        local.pop("output_layer.weight", None)
    out = {}
    for entry in conversion_map(m):
        wanted = [n for n in entry.meg if n in local]
        if not wanted:
            continue
        values = entry.to_meg(*(init_value(n, _shape(m, n), m, seed) for n in entry.ours))
        for name, value in zip(entry.meg, values, strict=True):
            if name in local:
                local_name, ref = local.pop(name)
                out[local_name] = take_slice(name, value, ref.shape, place).to(ref.dtype).clone()
    if local:
        raise RuntimeError(f"megatron tensor '{next(iter(local))}' has no kmoe initialisation")
    return out


def _shape(m: ModelConfig, name: str) -> torch.Size:
    from .convert import expected_shapes

    return torch.Size(expected_shapes(m)[name])


@dataclass
class Built:
    model: Any  # megatron DistributedDataParallel around this rank's GPTModel stage
    optimizer: Any  # megatron (chained) distributed optimizer
    config: Any  # TransformerConfig
    place: RankPlace


def build(run_cfg, layout: spec.Layout, seed: int, device: torch.device) -> Built:
    """This rank's model stage (kmoe's init), wrapped in megatron DDP, and megatron's distributed AdamW."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    m, t = run_cfg.model, run_cfg.train
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    config = spec.transformer_config(m, layout, params_dtype=dtype)
    model = spec.build_gpt_model(m, config).to(device)
    place = RankPlace.current(config)
    missing, unexpected = model.load_state_dict(init_local_state(m, model, place, seed), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"megatron model init: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            # megatron marks experts as expert-parallel only when EP > 1; marking them always gives every
            # layout the same optimizer structure (dense + expert), which dist_checkpointing needs to load an
            # EP > 1 checkpoint at EP = 1. Their gradients are then reduced over the expert data-parallel group,
            # which for EP = 1 is the data-parallel group.
            param.allreduce = False
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=True,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,  # megatron decays >=2-D weights only, as training/optim.py does
        adam_beta1=t.beta1,
        adam_beta2=t.beta2,
        adam_eps=t.eps,
        clip_grad=t.grad_clip,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=True,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    config.no_sync_func = ddp.no_sync
    return Built(ddp, optimizer, config, place)


def ensure_process_group(device: torch.device) -> None:
    """megatron needs torch.distributed even on one rank: a one-process group when there is none."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def parallel_dims(world: int):
    """This rank's ParallelDims from megatron's process groups (EP ranks are data-parallel ranks)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ...dims import ParallelDims

    tp_rank, cp_rank = ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()
    return ParallelDims(
        world=world,
        rank=dist.get_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_group=ps.get_data_parallel_group(),
        ep=ps.get_expert_model_parallel_world_size(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
        holds_loss=ps.is_pipeline_last_stage() and tp_rank == 0 and cp_rank == 0,
    )


def enable_recompute(config) -> None:
    """Activation checkpointing: megatron recomputes each whole layer in the backward pass."""
    config.recompute_granularity = "full"
    config.recompute_method = "uniform"
    config.recompute_num_layers = 1


def routers(gpt_model, m: ModelConfig) -> list[tuple[int, Any]]:
    """(MoE layer index among the model's MoE layers, router) of this pipeline stage, in layer order."""
    out = []
    for layer in gpt_model.decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if router is not None:
            out.append((layer.layer_number - 1 - m.first_k_dense, router))  # layer_number: global, 1-based
    return out


def no_load(m: ModelConfig) -> torch.Tensor:
    return torch.zeros(m.num_moe_layers, m.num_experts, dtype=torch.float64)


def global_expert_load(stage_routers, m: ModelConfig, device: torch.device) -> torch.Tensor:
    """Tokens per expert [L_moe, E] of the whole global batch, on every rank (collective).

    Each router counted the tokens it routed on this rank; they are summed over the tensor (sequence-
    parallel), context and data-parallel ranks, as megatron's own bias update sums them, and the pipeline
    stages' layers are put together.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    out = no_load(m).to(device)
    if stage_routers:
        local = torch.stack([r.local_tokens_per_expert.double() for _, r in stage_routers])
        dist.all_reduce(local, group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
        out[[i for i, _ in stage_routers]] = local
    dist.all_reduce(out, group=ps.get_pipeline_model_parallel_group())
    return out.cpu()


def clip(optimizer, max_norm: float, norm: float) -> None:
    """Scale every gradient shard by max_norm / norm when the global norm exceeds max_norm (as native)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if max_norm <= 0:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(params, max_norm=max_norm, total_norm=norm)
