"""GGUF writer: GLM4_MOE names and keys llama.cpp reads, experts merged, weights round-trip, tokenizer embedded."""

import gguf
import numpy as np
import pytest
import torch

from quantize.gguf_export import export_gguf, merged_tensors
from quantize.hfdir import read_config, read_state


def _field(r, key):
    f = r.fields[key]
    return (
        f.parts[f.data[0]].tolist()[0] if len(f.data) == 1 else [bytes(f.parts[i]).decode() for i in f.data]
    )


def test_experts_are_stacked_in_order_and_bias_renamed():
    state = {f"model.layers.1.mlp.experts.{e}.up_proj.weight": torch.full((2, 3), float(e)) for e in range(3)}
    state["model.layers.1.mlp.gate.e_score_correction_bias"] = torch.zeros(3)
    state["model.layers.1.mlp.shared_experts.up_proj.weight"] = torch.zeros(0, 3)  # no shared experts
    out = merged_tensors(state, 3)
    assert set(out) == {
        "model.layers.1.mlp.experts.up_proj.weight",
        "model.layers.1.mlp.gate.e_score_correction.bias",
    }
    assert out["model.layers.1.mlp.experts.up_proj.weight"][:, 0, 0].tolist() == [0.0, 1.0, 2.0]
    del state["model.layers.1.mlp.experts.1.up_proj.weight"]
    with pytest.raises(ValueError, match=r"experts \[0, 2\] present"):
        merged_tensors(state, 3)


@pytest.mark.parametrize("qtype,tol", [("f16", 1e-3), ("q8_0", 0.02), ("q4_0", 0.3)])
def test_gguf_holds_every_weight_with_llamacpp_keys(tiny_hf, tmp_path, qtype, tol):
    out = tmp_path / f"m-{qtype}.gguf"
    summary = export_gguf(tiny_hf, out, qtype)
    cfg = read_config(tiny_hf)
    r = gguf.GGUFReader(str(out))
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "glm4moe"
    assert _field(r, "glm4moe.expert_count") == cfg["n_routed_experts"]
    assert _field(r, "glm4moe.expert_used_count") == cfg["num_experts_per_tok"]
    assert _field(r, "glm4moe.expert_gating_func") == 2  # sigmoid
    assert _field(r, "glm4moe.leading_dense_block_count") == 1
    assert _field(r, "glm4moe.rope.dimension_count") == 8  # head_dim 16 x partial rotary 0.5
    tensors = {t.name: t for t in r.tensors}
    assert "blk.1.exp_probs_b.bias" in tensors and "blk.2.ffn_gate_exps.weight" in tensors
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    want = summary["tensor_types"]
    assert want.get(qtype.upper(), 0) > 0
    state = merged_tensors(read_state(tiny_hf), cfg["n_routed_experts"])
    for name, t in tensors.items():
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if name == "blk.2.ffn_down_exps.weight":
            ref = state["model.layers.2.mlp.experts.down_proj.weight"].numpy()
            assert w.shape == ref.shape  # [E, hidden, expert_ff]
            rel = np.abs(w - ref).mean() / np.abs(ref).mean()
            assert rel < tol, (name, rel)
    # our tokenizer: 400 trained tokens padded with unused ones to the model's 416
    toks = _field(r, "tokenizer.ggml.tokens")
    assert len(toks) == cfg["vocab_size"] and toks[-1] == "[PAD415]"
    assert bytes(r.fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert not _field(r, "tokenizer.ggml.add_bos_token")  # kmoe encodes without BOS


def test_4bit_gguf_is_under_035x_of_bf16(tiny_hf, tmp_path):
    export_gguf(tiny_hf, tmp_path / "q4.gguf", "q4_0")
    params = sum(t.numel() for t in read_state(tiny_hf).values())
    assert (tmp_path / "q4.gguf").stat().st_size <= 0.35 * 2 * params


def test_unknown_type_refused(tiny_hf, tmp_path):
    with pytest.raises(ValueError, match="--gguf-type"):
        export_gguf(tiny_hf, tmp_path / "x.gguf", "q3_k")


def test_sentencepiece_tokenizer_is_embedded_as_spm(tmp_path):
    import json

    import sentencepiece as spm
    from quantize_inputs import build_sp_tokenizer

    from quantize.gguf_vocab import add_vocab, special_ids

    tok = build_sp_tokenizer(tmp_path / "tok")
    sp = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "glm4moe")
    ids = special_ids(tok)
    assert add_vocab(w, tok, sp.get_piece_size() + 4, ids) == "llama"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    r = gguf.GGUFReader(str(tmp_path / "v.gguf"))
    toks = _field(r, "tokenizer.ggml.tokens")
    assert toks[: sp.get_piece_size()] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [
        r.fields["tokenizer.ggml.token_type"].parts[i].tolist()[0]
        for i in r.fields["tokenizer.ggml.token_type"].data
    ]
    assert types[sp.unk_id()] == gguf.TokenType.UNKNOWN and types[sp.bos_id()] == gguf.TokenType.CONTROL
    assert types[sp.piece_to_id("<0x41>")] == gguf.TokenType.BYTE and types[-1] == gguf.TokenType.UNUSED
    assert _field(r, "tokenizer.ggml.bos_token_id") == sp.bos_id() == ids["bos"]
    add_bos = json.loads((tok / "tokenizer_config.json").read_text())["add_bos_token"]
    assert bool(_field(r, "tokenizer.ggml.add_bos_token")) == add_bos
    assert "tokenizer.ggml.add_space_prefix" in r.fields


def test_kquant_without_llamacpp_says_how_to_get_it(tiny_hf, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as on a machine without the optional build
    with pytest.raises(ValueError, match="make llama-cpp"):
        export_gguf(tiny_hf, tmp_path / "k.gguf", "q4_k_m")
    assert not list(tmp_path.iterdir())
