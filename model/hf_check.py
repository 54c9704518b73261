"""Compare an exported HF directory with the kmoe checkpoint it came from (stock transformers, no remote code)."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_model_dir
from .transformer import MoETransformer


def load_ours(checkpoint: str | Path) -> MoETransformer:
    cfg, state = load_model_dir(checkpoint)
    model = MoETransformer(cfg)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def compare_logits(
    checkpoint: str | Path, hf_dir: str | Path, batch: int = 2, seq: int = 32, seed: int = 0
) -> float:
    """Max |logits(ours) - logits(transformers)| on random token ids, both in fp32."""
    from transformers import AutoModelForCausalLM

    ours = load_ours(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ours.cfg.vocab_size, (batch, min(seq, ours.cfg.max_seq_len)), generator=gen)
    return (ours(tokens).logits - hf(tokens).logits.float()).abs().max().item()
