"""Dense building blocks: RMSNorm, rotary embedding, grouped-query attention, SwiGLU.

Shape suffixes: B batch, S sequence, D hidden, H query heads, G key/value heads, K head dim, F ffn width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, then scaled by the weight in the input dtype (as Glm4Moe/Llama do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(positions_S: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [S, rotary_dim] in the 'rotate half' (NEOX) layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs_SR = positions_S.float()[:, None] * inv_freq.to(positions_S.device)[None, :]
    emb = torch.cat((freqs_SR, freqs_SR), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHSK: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotate the first R channels of each head; the rest pass through (partial rotary)."""
    r = cos_SR.shape[-1]
    x_rot, x_pass = x_BHSK[..., :r], x_BHSK[..., r:]
    x_rot = x_rot * cos_SR + _rotate_half(x_rot) * sin_SR
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE and optional QK-norm, via scaled_dot_product_attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.dim_head
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
        b, s, _ = x_BSD.shape
        q_BSHK = self.q_proj(x_BSD).view(b, s, self.n_heads, self.head_dim)
        k_BSGK = self.k_proj(x_BSD).view(b, s, self.n_kv, self.head_dim)
        v_BSGK = self.v_proj(x_BSD).view(b, s, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q_BSHK, k_BSGK = self.q_norm(q_BSHK), self.k_norm(k_BSGK)
        q_BHSK = apply_rope(q_BSHK.transpose(1, 2), cos_SR, sin_SR)
        k_BGSK = apply_rope(k_BSGK.transpose(1, 2), cos_SR, sin_SR)
        v_BGSK = v_BSGK.transpose(1, 2)
        o_BHSK = F.scaled_dot_product_attention(
            q_BHSK, k_BGSK, v_BGSK, is_causal=True, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(o_BHSK.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); used for dense layers and the shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
