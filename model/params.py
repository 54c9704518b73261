"""Parameter counts, FLOPs per token and weight memory, computed from the config alone (no weights built)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass
class ModelSize:
    total: int
    active: int  # parameters touched per token (top-k + shared experts, all dense parts, embeddings)
    embedding: int  # input embeddings + LM head
    attention: int
    routed_experts: int
    shared_and_dense_ffn: int
    router: int
    norms: int
    flops_fwd_per_token: float  # matmul FLOPs at `seq_len`, causal attention counted in full
    flops_train_per_token: float  # 3x forward (backward costs about twice the forward)
    seq_len: int

    def weight_bytes(self, bits: int) -> int:
        return self.total * bits // 8


def model_size(cfg: ModelConfig, seq_len: int | None = None) -> ModelSize:
    seq_len = seq_len or cfg.max_seq_len
    d, hd = cfg.hidden_size, cfg.dim_head
    attn = d * hd * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    qk_norm = 2 * hd if cfg.qk_norm else 0
    expert = 3 * d * cfg.expert_intermediate_size
    n_moe, n_dense = cfg.num_moe_layers, cfg.first_k_dense
    routed = n_moe * cfg.num_experts * expert
    routed_active = n_moe * cfg.num_experts_per_tok * expert
    shared = n_moe * cfg.num_shared_experts * expert + n_dense * 3 * d * cfg.dense_intermediate_size
    router = n_moe * cfg.num_experts * d
    norms = cfg.num_layers * (2 * d + qk_norm) + d
    embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    attention = cfg.num_layers * attn
    total = embed + attention + routed + shared + router + norms
    active = embed + attention + routed_active + shared + router + norms
    # Matmul FLOPs: 2 per weight touched (embedding lookup excluded, LM head included) plus attention
    # scores and values: 2 * 2 * S * H * head_dim per layer for the full (non-causal-halved) matrix.
    matmul_params = active - cfg.vocab_size * d - norms
    if cfg.tie_embeddings:
        matmul_params += cfg.vocab_size * d
    fwd = 2 * matmul_params + 4 * seq_len * cfg.num_heads * hd * cfg.num_layers
    return ModelSize(
        total=total, active=active, embedding=embed, attention=attention, routed_experts=routed,
        shared_and_dense_ffn=shared, router=router, norms=norms, flops_fwd_per_token=float(fwd),
        flops_train_per_token=float(3 * fwd), seq_len=seq_len,
    )  # fmt: skip


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    for div, suffix in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"
