"""bitsandbytes NF4/int8: every expert matrix is stored quantized and the kmoe loader runs it in stock Glm4Moe."""

import pytest
import torch
from safetensors import safe_open

from quantize.bnb import WEIGHTS, dequantize, load_bnb, quantize_bnb, quantize_tensor


@pytest.mark.parametrize("method,tol", [("nf4", 0.12), ("int8", 0.01)])
def test_roundtrip_error(method, tol):
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    parts = quantize_tensor(w, method)
    assert parts[""].dtype == (torch.uint8 if method == "nf4" else torch.int8)
    assert parts[""].numel() == w.numel() // (2 if method == "nf4" else 1)
    err = (dequantize(parts, tuple(w.shape), method) - w).abs().mean() / w.abs().mean()
    assert err < tol


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_every_expert_quantized_and_loader_tracks_logits(tiny_hf, tmp_path, method):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    summary = quantize_bnb(tiny_hf, out, method)
    assert summary["experts_quantized"] == 2 * 8 * 3  # 2 MoE layers x 8 experts x gate/up/down
    with safe_open(str(out / WEIGHTS), "pt") as f:
        names = set(f.keys())
        for e in range(8):
            t = f.get_tensor(f"model.layers.2.mlp.experts.{e}.down_proj.weight")
            assert t.dtype == (torch.uint8 if method == "nf4" else torch.int8)
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32  # router kept
    assert "model.layers.1.mlp.experts.0.up_proj.weight.absmax" in names or method == "int8"
    model = load_bnb(out)
    experts = model.model.layers[1].mlp.experts
    assert type(experts).__name__ == "QuantExperts"
    assert experts.experts[3]["gate_proj"].parts()[""].dtype in (torch.uint8, torch.int8)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_hf), dtype=torch.float32).eval()
    x = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(x).logits, model(x).logits
    rel = ((a - b).abs().mean() / a.abs().mean()).item()
    assert rel < (0.3 if method == "nf4" else 0.05), rel


def test_stock_transformers_cannot_load_it(tiny_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    quantize_bnb(tiny_hf, tmp_path / "nf4", "nf4")
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "nf4"))


def test_sharded_source_gives_sharded_artifact_that_loads(tiny_hf, tmp_path):
    from model.export_hf import export_hf
    from quantize.gguf_export import export_gguf

    sharded = tmp_path / "hf-sharded"
    export_hf(tiny_hf.parent / "ckpt", sharded, dtype="float32", tokenizer_dir=tiny_hf.parent / "tok",
              max_shard_bytes=200_000)  # fmt: skip
    assert (sharded / "model.safetensors.index.json").is_file()
    one, many = (
        quantize_bnb(tiny_hf, tmp_path / "one", "int8"),
        quantize_bnb(sharded, tmp_path / "many", "int8"),
    )
    assert many["files"] > 1 and many["quantized"] == one["quantized"]
    x = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(load_bnb(tmp_path / "one")(x).logits, load_bnb(tmp_path / "many")(x).logits)
    export_gguf(tiny_hf, tmp_path / "a.gguf", "q8_0")
    export_gguf(sharded, tmp_path / "b.gguf", "q8_0")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
