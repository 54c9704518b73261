"""The decoder-only MoE transformer: embeddings, pre-norm blocks, final norm, untied LM head.

No process groups, devices or files in here: `training/parallel.py` wraps it, `model/export_hf.py` maps it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import ModelConfig
from .layers import Attention, RMSNorm, SwiGLU, rope_cos_sin
from .moe import MoE


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [B, S, V]
    aux_loss: torch.Tensor | None  # sum of router balance/z losses over layers (training only)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (
            MoE(cfg) if cfg.is_moe_layer(layer_idx) else SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size)
        )

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin)
        return x_BSD + self.mlp(self.mlp_norm(x_BSD))


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def moe_layers(self) -> list[MoE]:
        return [blk.mlp for blk in self.layers if isinstance(blk.mlp, MoE)]

    def forward(self, tokens_BS: torch.Tensor) -> ModelOutput:
        s = tokens_BS.shape[1]
        x_BSD = self.embed(tokens_BS)
        positions = torch.arange(s, device=tokens_BS.device)
        cos, sin = rope_cos_sin(positions, self.cfg.rotary_dim, self.cfg.rope_theta, x_BSD.dtype)
        for blk in self.layers:
            x_BSD = blk(x_BSD, cos, sin)
        x_BSD = self.norm(x_BSD)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = torch.nn.functional.linear(x_BSD, head)
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return ModelOutput(logits, torch.stack(aux).sum() if aux else None)

    @torch.no_grad()
    def update_router_bias(self, loads_LE: torch.Tensor | None = None) -> torch.Tensor:
        """One aux-loss-free bias step in every MoE layer; returns the observed load [L_moe, E]."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, self.cfg.num_experts)
        observed = [m.update_bias(None if loads_LE is None else loads_LE[i]) for i, m in enumerate(layers)]
        return torch.stack(observed)

    def expert_load(self) -> torch.Tensor:
        """Tokens per expert since the last bias update, [L_moe, E] (float64)."""
        layers = self.moe_layers()
        return torch.stack([m.load_E for m in layers]) if layers else torch.zeros(0, self.cfg.num_experts)
