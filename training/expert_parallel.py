"""Expert parallelism for the native engine, the torchtitan way.

The device mesh is [efsdp, ep]: `ep` consecutive ranks form an expert group and borrow their ranks from data
parallelism (every rank still trains on its own slice of the batch). Each MoE layer's routed experts, 3-D
tensors [E, ...], are sharded on the expert dimension across the `ep` ranks (Shard(0): rank r of the group
holds experts [r*E/ep, (r+1)*E/ep)) and FSDP2-sharded over the `efsdp` ranks that hold the same experts;
everything else is FSDP2-sharded over all ranks. In the forward, each (token, expert) pair goes to the rank
holding its expert by `all_to_all_single` (gloo and nccl both have it; the split sizes are exchanged first),
the rank runs only its E/ep local experts on the rows it received (torch._grouped_mm where it applies, the
loop otherwise), and a second all-to-all brings the outputs back to their tokens.

Shape suffixes as in model/moe.py: N pairs sorted by global expert on the sending rank, M rows received on
this rank (grouped by source rank, then by local expert), L local experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from model.moe import Dispatch, GroupedExperts, MoE, expert_swiglu, sort_by_expert, weighted_sum


def regroup_index(counts_SL: torch.Tensor) -> torch.Tensor:
    """Row order that turns rows grouped [source rank][local expert] into [local expert][source rank].

    `counts_SL[s, l]` rows came from source rank s for local expert l, laid out source-major (as the
    all-to-all delivers them); the experts need them expert-major. Pure; its inverse undoes it."""
    sources, local = counts_SL.shape
    flat = counts_SL.reshape(-1)
    starts_SL = (torch.cumsum(flat, 0) - flat).view(sources, local)
    pieces = [
        torch.arange(int(starts_SL[i, e]), int(starts_SL[i, e] + counts_SL[i, e]), dtype=torch.int64)
        for e in range(local)
        for i in range(sources)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


class AllToAllDispatcher:
    """Sends each token-expert pair to the rank of the expert group that holds its expert and back."""

    def __init__(self, group: dist.ProcessGroup, ep: int, num_experts: int):
        self.group, self.ep, self.local = group, ep, num_experts // ep

    def dispatch(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, counts_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Dispatch]:
        x_ND, d = sort_by_expert(x_TD, experts_TK)
        # How many rows each source rank sends to each of my local experts: [source, local expert].
        counts_SL = all_to_all_single(counts_E, None, None, self.group).view(self.ep, self.local)
        send = counts_E.view(self.ep, self.local).sum(1).tolist()
        recv = counts_SL.sum(1).tolist()
        x_MD = all_to_all_single_autograd(x_ND, recv, send, self.group)
        order_M = regroup_index(counts_SL.cpu()).to(x_MD.device)
        return x_MD[order_M], counts_SL.sum(0), Dispatch(d.order_N, d.token_N, (order_M, send, recv))

    def combine(
        self, y_MD: torch.Tensor, weights_TK: torch.Tensor, d: Dispatch, x_TD: torch.Tensor
    ) -> torch.Tensor:
        order_M, send, recv = d.extra
        back_MD = torch.empty_like(y_MD).index_copy(0, order_M, y_MD)  # source-major again
        y_ND = all_to_all_single_autograd(back_MD, send, recv, self.group)
        return weighted_sum(y_ND, weights_TK, d, x_TD)


class LocalShardExperts(GroupedExperts):
    """GroupedExperts whose weights are DTensors sharded on the expert dimension: it computes with this rank's
    E/ep experts (the same parameter names, so checkpoints and digests keep kmoe's names)."""

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        w = [
            p.to_local() if hasattr(p, "to_local") else p
            for p in (self.gate_proj, self.up_proj, self.down_proj)
        ]
        return expert_swiglu(x_ND, counts_E, *w, impl)


def expert_mesh(device_type: str, world: int, ep: int) -> DeviceMesh:
    """The [efsdp, ep] mesh: ranks r with the same r // ep share an expert group."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("efsdp", "ep"))


def shard_experts(moe: MoE, mesh: DeviceMesh) -> None:
    """Swap in the expert-parallel experts (sharded across `mesh["ep"]`) and the all-to-all dispatcher.
    Call on a model built on the meta device, before FSDP2 wraps it."""
    ep_mesh, cfg = mesh["ep"], moe.cfg
    with torch.device("meta"):
        experts = LocalShardExperts(cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size)
    for name, param in list(experts.named_parameters()):
        sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
        experts.register_parameter(name, torch.nn.Parameter(sharded))
    moe.experts = experts
    moe.dispatcher = AllToAllDispatcher(ep_mesh.get_group(), ep_mesh.size(), cfg.num_experts)


def fully_shard_experts(moe: MoE, mesh: DeviceMesh, world: int, mp_policy) -> None:
    """FSDP2 over the `efsdp` ranks that hold the same experts (on dim 1 when there are fewer local experts
    than such ranks). The gradients are divided by the world size, as every other parameter's are: each
    expert's gradient sums the token loss of the whole global batch, scaled by the data-parallel size."""
    from torch.distributed.fsdp import fully_shard

    efsdp = mesh["efsdp"]
    local = moe.cfg.num_experts // mesh["ep"].size()
    dim = 1 if local < efsdp.size() else 0
    fully_shard(moe.experts, mesh=efsdp, mp_policy=mp_policy, shard_placement_fn=lambda _: Shard(dim))
    moe.experts.set_gradient_divide_factor(float(world))
    if efsdp.device_type == "cpu":  # gloo has no PREMUL_SUM: reduce with SUM, then divide
        moe.experts.set_force_sum_reduction_for_comms(True)
