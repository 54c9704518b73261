"""The MoE feed-forward block: router, dropless dispatch, grouped SwiGLU experts, shared experts.

Shape suffixes: T tokens, D hidden, E routed experts, K experts per token, F expert width,
N = T*K token-expert pairs sorted by expert.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import router as R
from .config import ModelConfig
from .layers import SwiGLU


def grouped_mm_applies(x_ND: torch.Tensor, w_EFD: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned rows; on CUDA it needs bf16 on sm90+."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    align = 16 // x_ND.element_size()
    if x_ND.shape[-1] % align or w_EFD.shape[1] % align:
        return False
    if x_ND.is_cuda:
        return x_ND.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x_ND.device)[0] >= 9
    return x_ND.dtype in (torch.float32, torch.bfloat16)


def expert_swiglu(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    gate_EFD: torch.Tensor,
    up_EFD: torch.Tensor,
    down_EDF: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """SwiGLU of each expert on its rows of `x_ND` (rows sorted by expert, `counts_E` rows each)."""
    if impl == "grouped_mm" or (impl == "auto" and grouped_mm_applies(x_ND, gate_EFD)):
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        h_NF = F.silu(torch._grouped_mm(x_ND, gate_EFD.transpose(-2, -1), offs=offs))
        h_NF = h_NF * torch._grouped_mm(x_ND, up_EFD.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(h_NF, down_EDF.transpose(-2, -1), offs=offs)
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        if n == 0:
            continue
        x = x_ND[start : start + n]
        h = F.silu(F.linear(x, gate_EFD[e])) * F.linear(x, up_EFD[e])
        outs.append(F.linear(h, down_EDF[e]))
        start += n
    if not outs:
        return x_ND.new_zeros(0, down_EDF.shape[1])
    return torch.cat(outs, dim=0)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D tensors in per-expert nn.Linear layout (out, in)."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))  # EFD
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))  # EFD
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))  # EDF

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        return expert_swiglu(x_ND, counts_E, self.gate_proj, self.up_proj, self.down_proj, impl)


class Dispatch(NamedTuple):
    """What `combine` needs to bring expert outputs back to their tokens."""

    order_N: torch.Tensor  # token-expert pairs (flattened T*K) sorted by expert
    token_N: torch.Tensor  # the token of each sorted pair
    extra: Any = None  # a dispatcher's own state (an all-to-all's split sizes)


class LocalDispatcher:
    """Every expert on this process: sort the token-expert pairs by expert, run, weight and sum back.

    The MoE block calls its dispatcher for the token exchange around its experts; parallel code swaps in
    another (training/expert_parallel.py sends each pair to the rank holding its expert) without the model
    knowing."""

    def dispatch(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, counts_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Dispatch]:
        """(rows for the local experts sorted by expert, rows per local expert, state for `combine`)."""
        x_ND, d = sort_by_expert(x_TD, experts_TK)
        return x_ND, counts_E, d

    def combine(
        self, y_ND: torch.Tensor, weights_TK: torch.Tensor, d: Dispatch, x_TD: torch.Tensor
    ) -> torch.Tensor:
        return weighted_sum(y_ND, weights_TK, d, x_TD)


def sort_by_expert(x_TD: torch.Tensor, experts_TK: torch.Tensor) -> tuple[torch.Tensor, Dispatch]:
    """Token rows of each (token, expert) pair, sorted by expert (stable: token order within an expert)."""
    k = experts_TK.shape[-1]
    order_N = torch.argsort(experts_TK.reshape(-1), stable=True)
    token_N = order_N // k
    return x_TD[token_N], Dispatch(order_N, token_N)


def weighted_sum(
    y_ND: torch.Tensor, weights_TK: torch.Tensor, d: Dispatch, x_TD: torch.Tensor
) -> torch.Tensor:
    """Expert outputs of the sorted pairs, weighted by their routing weights and summed per token."""
    y_ND = y_ND * weights_TK.reshape(-1)[d.order_N].unsqueeze(-1).to(y_ND.dtype)
    return torch.zeros_like(x_TD).index_add_(0, d.token_N, y_ND)


class Router(nn.Module):
    """Linear scores over E experts plus the aux-loss-free selection bias (a buffer, not a parameter)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TD.float(), self.weight.float())  # router math in fp32


class MoE(nn.Module):
    """Top-k routed experts plus always-on shared experts; dropless, tokens sorted by expert."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size)
        width = cfg.expert_intermediate_size * cfg.num_shared_experts
        self.shared = SwiGLU(cfg.hidden_size, width) if width else None
        # Tokens per expert seen since the last bias update (summed over micro-batches), counted in training
        # forwards while `count_load` is set: an engine clears it while a backward recomputes forwards
        # (activation checkpointing), so each routing decision counts once.
        self.register_buffer("load_E", torch.zeros(cfg.num_experts, dtype=torch.float64), persistent=False)
        self.count_load = True
        self.dispatcher: LocalDispatcher = LocalDispatcher()
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, s, d = x_BSD.shape
        x_TD = x_BSD.reshape(-1, d)
        logits_TE = self.router(x_TD)
        r = R.route(
            logits_TE, self.router.expert_bias, cfg.num_experts_per_tok, cfg.router_score,
            cfg.norm_topk_prob, cfg.routed_scaling_factor,
        )  # fmt: skip
        counts_E = R.expert_counts(r.experts_TK, cfg.num_experts)
        x_ND, counts_local, sent = self.dispatcher.dispatch(x_TD, r.experts_TK, counts_E)
        y_ND = self.experts(x_ND, counts_local, cfg.moe_impl)
        out_TD = self.dispatcher.combine(y_ND, r.weights_TK, sent, x_TD)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        if self.training and self.count_load:
            with torch.no_grad():
                self.load_E += counts_E.to(self.load_E.dtype)
        self.aux_loss = self._aux_loss(logits_TE, r, b, s)
        return out_TD.view(b, s, d)

    def _aux_loss(self, logits_TE: torch.Tensor, r: R.Routing, b: int, s: int) -> torch.Tensor | None:
        if not self.training:
            return None
        loss = None
        if self.cfg.balance_loss_coeff > 0:
            e, k = self.cfg.num_experts, self.cfg.num_experts_per_tok
            seq = R.sequence_balance_loss(r.scores_TE.view(b, s, e), r.experts_TK.view(b, s, k))
            loss = self.cfg.balance_loss_coeff * seq
        if self.cfg.z_loss_coeff > 0:
            z = self.cfg.z_loss_coeff * R.z_loss(logits_TE)
            loss = z if loss is None else loss + z
        return loss

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor | None = None) -> torch.Tensor:
        """Apply one aux-loss-free bias step from the observed load (all-reduced by the caller if needed)."""
        load = self.load_E if load_E is None else load_E
        if self.cfg.bias_update_rate > 0:
            new = R.bias_update(
                self.router.expert_bias, load.to(self.router.expert_bias.device), self.cfg.bias_update_rate
            )
            self.router.expert_bias.copy_(new)
        observed = load.clone()
        self.load_E.zero_()
        return observed
