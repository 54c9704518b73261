"""HF Glm4Moe directory -> one GGUF file for llama.cpp's GLM4_MOE architecture (f16, q8_0, q4_0, ...).

The `gguf` package has the writer, the tensor name map and the numpy quantizers but no HF converter; this is
ours. llama.cpp's GLM4_MOE wants experts merged into 3-D `ffn_{gate,up,down}_exps`, the correction bias as
`exp_probs_b.bias` (HF `e_score_correction_bias` is renamed to `e_score_correction.bias` before the name
lookup, else llama.cpp fails with a bare "Failed to load model"), NEOX rope over the rotary part of each head,
and the `glm4moe.expert_*` keys. Router, correction bias and norms stay F32; a matrix whose rows are not a
multiple of the quant block (32) falls back to F16.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import gguf
import numpy as np
import torch

from .gguf_vocab import add_vocab, special_ids
from .hfdir import read_config, read_state

log = logging.getLogger(__name__)
ARCH = gguf.MODEL_ARCH.GLM4_MOE
QT = gguf.GGMLQuantizationType
TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1, "q5_0": QT.Q5_0}
FTYPES = {
    "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
}  # fmt: skip
EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
KEEP_F32 = ("ffn_gate_inp", "exp_probs_b", "_norm")


def merged_tensors(state: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """Stack per-expert matrices into [E, out, in]; rename the correction bias for the name map."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in state.items():
        m = EXPERT.match(name)
        if m:
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = t
        elif name.endswith("e_score_correction_bias"):
            out[name.replace("e_score_correction_bias", "e_score_correction.bias")] = t
        elif t.numel():  # Glm4Moe's zero-width shared expert (no shared experts) has nothing to write
            out[name] = t
    for (prefix, proj), per in experts.items():
        if sorted(per) != list(range(n_experts)):
            raise ValueError(f"{prefix}.*.{proj}: experts {sorted(per)} present, expected 0..{n_experts - 1}")
        out[f"{prefix}.{proj}.weight"] = torch.stack([per[e] for e in range(n_experts)])
    return out


def gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ValueError(f"{hf_name}: no GGUF GLM4_MOE tensor name for it")
    return new


def pick_type(gname: str, t: np.ndarray, qtype: str) -> gguf.GGMLQuantizationType:
    if t.ndim == 1 or any(k in gname for k in KEEP_F32) or qtype == "f32":
        return QT.F32
    target = TYPES[qtype]
    block = gguf.GGML_QUANT_SIZES[target][0]
    if t.shape[-1] % block:
        log.warning("%s: row length %d is not a multiple of %d; stored F16", gname, t.shape[-1], block)
        return QT.F16
    return target


def add_hparams(w: gguf.GGUFWriter, cfg: dict, qtype: str) -> None:
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    rotary = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5)))
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(int(head_dim * rotary))
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["n_routed_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_count(cfg.get("n_shared_experts") or 0)
    w.add_leading_dense_block_count(cfg.get("first_k_dense_replace") or 0)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
    w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", True)))
    w.add_nextn_predict_layers(cfg.get("num_nextn_predict_layers") or 0)
    w.add_file_type(FTYPES[qtype])


def export_gguf(hf_dir: str | Path, out_file: str | Path, qtype: str = "q8_0") -> dict:
    """Write `out_file`; returns a summary with tensor types and the tokenizer kind embedded."""
    if qtype not in TYPES:
        raise ValueError(f"--gguf-type {qtype!r} is not one of {sorted(TYPES)}")
    d = Path(hf_dir)
    cfg = read_config(d)
    if cfg.get("n_group", 1) != 1 or cfg.get("topk_group", 1) != 1:
        raise ValueError(f"{d}/config.json: grouped routing (n_group>1) is not exported to GGUF here")
    state = merged_tensors(read_state(d), cfg["n_routed_experts"])
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when `output` is absent
    name_map = gguf.get_tensor_name_map(ARCH, cfg["num_hidden_layers"])
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[ARCH])
    add_hparams(w, cfg, qtype)
    kind = add_vocab(w, d, cfg["vocab_size"], special_ids(d))
    types: dict[str, int] = {}
    for hf_name in sorted(state):
        gname = gguf_name(name_map, hf_name)
        arr = state[hf_name].float().numpy()
        t = pick_type(gname, arr, qtype)
        data = (
            gguf.quants.quantize(arr, t)
            if t not in (QT.F32, QT.F16)
            else arr.astype(np.float32 if t == QT.F32 else np.float16)
        )
        w.add_tensor(gname, data, raw_dtype=t if t not in (QT.F32, QT.F16) else None)
        types[t.name] = types.get(t.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"gguf_type": qtype, "file": out.name, "tensor_types": types, "tokenizer": kind, "arch": "glm4moe"}
