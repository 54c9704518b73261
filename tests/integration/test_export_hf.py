"""Random-init model -> kmoe checkpoint -> stock transformers (no remote code) -> same logits."""

import json

import pytest
import torch
from model_fixtures import random_checkpoint

from model import ModelConfig
from model.checkpoint import CheckpointError
from model.export_hf import ExportError, export_hf
from model.hf_check import compare_logits

CONFIGS = {
    # shared expert + QK-norm + one dense first layer + partial rotary
    "shared_qknorm_dense": dict(qk_norm=True, first_k_dense=1, num_shared_experts=1, rotary_fraction=0.5),
    # no shared expert, no QK-norm, all layers MoE, tied embeddings, unnormalised scaled weights
    "plain": dict(qk_norm=False, first_k_dense=0, num_shared_experts=0, tie_embeddings=True,
                  norm_topk_prob=False, routed_scaling_factor=2.5),
}  # fmt: skip


def _checkpoint(tmp_path, **kw):
    cfg = ModelConfig(
        vocab_size=96, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=64,
        dense_intermediate_size=96, num_experts=6, num_experts_per_tok=2, expert_intermediate_size=32, **kw,
    )  # fmt: skip
    return random_checkpoint(tmp_path / "ckpt", cfg, seed=11), cfg


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_stock_transformers_with_same_logits(tmp_path, name):
    ckpt, cfg = _checkpoint(tmp_path, **CONFIGS[name])
    out = tmp_path / "hf"
    export_hf(ckpt, out, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Glm4MoeForCausalLM"] and "auto_map" not in config
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(hf).__name__ == "Glm4MoeForCausalLM"
    assert compare_logits(ckpt, out, batch=3, seq=48) <= 1e-4


def test_export_generates(tmp_path):
    ckpt, cfg = _checkpoint(tmp_path, **CONFIGS["plain"])
    export_hf(ckpt, tmp_path / "hf", dtype="bfloat16")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert hf.dtype == torch.bfloat16
    out = hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_export_refuses_what_glm4moe_cannot_compute(tmp_path):
    ckpt, _ = _checkpoint(tmp_path, router_score="softmax")
    with pytest.raises(ExportError, match="router_score"):
        export_hf(ckpt, tmp_path / "hf")


def test_corrupted_checkpoint_is_refused_naming_the_tensor(tmp_path):
    ckpt, _ = _checkpoint(tmp_path, **CONFIGS["plain"])
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF  # last bytes belong to the last tensor in the file
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="tensor '.*' does not match"):
        export_hf(ckpt, tmp_path / "hf")


def test_parity_check_catches_a_wrong_expert_order(tmp_path):
    """The logits comparison is not vacuous: swapping two experts in the export is detected."""
    from safetensors.torch import load_file, save_file

    ckpt, _ = _checkpoint(tmp_path, **CONFIGS["shared_qknorm_dense"])
    out = tmp_path / "hf"
    export_hf(ckpt, out, dtype="float32")
    tensors = load_file(str(out / "model.safetensors"))
    for p in ("gate_proj", "up_proj", "down_proj"):
        a, b = f"model.layers.2.mlp.experts.0.{p}.weight", f"model.layers.2.mlp.experts.1.{p}.weight"
        tensors[a], tensors[b] = tensors[b], tensors[a]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert compare_logits(ckpt, out, batch=3, seq=48) > 1e-3
