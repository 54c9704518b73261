"""ModelConfig: the shape of the decoder-only MoE transformer, and its consistency checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kmoe.configtree import ConfigError


@dataclass
class ModelConfig:
    """Architecture of the MoE transformer. Every field maps to a Glm4Moe `config.json` key on export."""

    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int | None = None  # default hidden_size // num_heads
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # share of head_dim that is rotated (GLM-4.5 uses 0.5)
    rms_norm_eps: float = 1e-5
    qk_norm: bool = False
    # Feed-forward: the first `first_k_dense` layers are dense SwiGLU, the rest are MoE.
    first_k_dense: int = 0
    dense_intermediate_size: int = 2048
    num_experts: int = 16
    num_experts_per_tok: int = 2
    expert_intermediate_size: int = 256
    num_shared_experts: int = 1  # each of width expert_intermediate_size
    # Router: sigmoid scores, top-k chosen on score + bias, weights from the scores alone.
    router_score: Literal["sigmoid", "softmax"] = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # Balancing defaults for short, high-lr runs (docs/training.md "Expert balance"): DeepSeek-V3's values for a
    # 100B-scale run are 1e-3 and 1e-4 (configs/model/solar100b.yaml); at 1e-3/0 the tiny demo's experts die early.
    bias_update_rate: float = 2e-2  # aux-loss-free balancing step (DeepSeek-V3 gamma); 0 disables
    balance_loss_coeff: float = 1e-3  # sequence-level balance loss (alpha); 0 disables
    z_loss_coeff: float = 0.0  # router z-loss; 0 disables
    moe_impl: Literal["auto", "grouped_mm", "loop"] = "auto"
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_head * self.rotary_fraction)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense


def validate_model(cfg: ModelConfig, prefix: str = "model") -> None:
    """Cross-field checks; raises ConfigError naming the offending key."""

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{prefix}.{key}: {msg}")

    positive = [
        "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "max_seq_len",
        "num_experts", "num_experts_per_tok", "expert_intermediate_size",
    ]  # fmt: skip
    for key in positive:
        if getattr(cfg, key) <= 0:
            fail(key, f"must be positive, got {getattr(cfg, key)}")
    if cfg.head_dim is None and cfg.hidden_size % cfg.num_heads:
        fail("num_heads", f"{cfg.num_heads} heads do not divide hidden_size {cfg.hidden_size}; set head_dim")
    if cfg.head_dim is not None and cfg.head_dim <= 0:
        fail("head_dim", f"must be positive, got {cfg.head_dim}")
    if cfg.num_heads % cfg.num_kv_heads:
        fail(
            "num_kv_heads",
            f"{cfg.num_kv_heads} KV heads do not divide num_heads {cfg.num_heads} (GQA groups)",
        )
    if not 0 < cfg.rotary_fraction <= 1 or cfg.rotary_dim % 2:
        fail(
            "rotary_fraction",
            f"{cfg.rotary_fraction} x head_dim {cfg.dim_head} must give an even rotary dim > 0",
        )
    if cfg.num_experts_per_tok > cfg.num_experts:
        fail("num_experts_per_tok", f"top-k {cfg.num_experts_per_tok} exceeds num_experts {cfg.num_experts}")
    if not 0 <= cfg.first_k_dense <= cfg.num_layers:
        fail("first_k_dense", f"{cfg.first_k_dense} is outside 0..num_layers ({cfg.num_layers})")
    if cfg.first_k_dense and cfg.dense_intermediate_size <= 0:
        fail("dense_intermediate_size", "must be positive when first_k_dense > 0")
    if cfg.num_shared_experts < 0:
        fail("num_shared_experts", "must be >= 0")
    for key in ("rms_norm_eps", "init_std", "rope_theta", "routed_scaling_factor"):
        if getattr(cfg, key) <= 0:
            fail(key, f"must be positive, got {getattr(cfg, key)}")
    for key in ("bias_update_rate", "balance_loss_coeff", "z_loss_coeff"):
        if getattr(cfg, key) < 0:
            fail(key, f"must be >= 0, got {getattr(cfg, key)}")
