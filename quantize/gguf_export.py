"""HF Glm4Moe directory -> one GGUF file for llama.cpp's GLM4_MOE architecture (f16, q8_0, q4_0, ...).

The `gguf` package has the writer, the tensor name map and the numpy quantizers but no HF converter; this is
ours. llama.cpp's GLM4_MOE wants experts merged into 3-D `ffn_{gate,up,down}_exps`, the correction bias as
`exp_probs_b.bias` (HF `e_score_correction_bias` is renamed to `e_score_correction.bias` before the name
lookup, else llama.cpp fails with a bare "Failed to load model"), NEOX rope over the rotary part of each head,
and the `glm4moe.expert_*` keys. Router, correction bias and norms stay F32; a matrix whose rows are not a
multiple of the quant block (32) falls back to F16.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from .gguf_vocab import add_vocab, special_ids
from .hfdir import read_config

log = logging.getLogger(__name__)
ARCH = gguf.MODEL_ARCH.GLM4_MOE
QT = gguf.GGMLQuantizationType
TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1, "q5_0": QT.Q5_0}
FTYPES = {
    "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
}  # fmt: skip
# K-quants have no numpy quantizer in `gguf`: written as F16, then requantized by llama.cpp itself
# (`llama_model_quantize`, needs llama-cpp-python: `make llama-cpp`), which keeps ffn_gate_inp and norms F32.
KQUANTS = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
KEEP_F32 = ("ffn_gate_inp", "exp_probs_b", "_norm")
ZEROS = "<zeros>"


def plan_tensors(shapes: dict[str, list[int]], n_experts: int, tied: bool = False) -> dict[str, list[str]]:
    """Output HF-style name -> source tensor names: experts stacked into [E, out, in] in expert order, the
    correction bias renamed for the name map, zero-width tensors and a tied lm_head dropped."""
    plan: dict[str, list[str]] = {}
    experts: dict[str, dict[int, str]] = {}
    for name, shape in shapes.items():
        m = EXPERT.match(name)
        if m:
            experts.setdefault(f"{m[1]}.{m[3]}.weight", {})[int(m[2])] = name
        elif name.endswith("e_score_correction_bias"):
            plan[name.replace("e_score_correction_bias", "e_score_correction.bias")] = [name]
        elif name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when `output` is absent
        elif 0 in shape:  # Glm4Moe's no-op shared expert (no shared experts): llama.cpp still computes one,
            plan[name] = [ZEROS]  # so it gets a zero expert of one expert's width, an exact no-op too
        else:
            plan[name] = [name]
    for target, per in experts.items():
        if sorted(per) != list(range(n_experts)):
            raise ValueError(f"{target}: experts {sorted(per)} present, expected 0..{n_experts - 1}")
        plan[target] = [per[e] for e in range(n_experts)]
    return dict(sorted(plan.items()))


def merged_tensors(state: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """The planned tensors materialised (for checks; the writer streams them one at a time)."""
    plan = plan_tensors({k: list(v.shape) for k, v in state.items()}, n_experts)
    return {t: state[s[0]] if len(s) == 1 and not EXPERT.match(s[0]) else torch.stack([state[n] for n in s])
            for t, s in plan.items() if s != [ZEROS]}  # fmt: skip


def gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ValueError(f"{hf_name}: no GGUF GLM4_MOE tensor name for it")
    return new


def pick_type(gname: str, shape: list[int], qtype: str) -> gguf.GGMLQuantizationType:
    if len(shape) == 1 or any(k in gname for k in KEEP_F32) or qtype == "f32":
        return QT.F32
    target = TYPES[qtype]
    block = gguf.GGML_QUANT_SIZES[target][0]
    if shape[-1] % block:
        log.warning("%s: row length %d is not a multiple of %d; stored F16", gname, shape[-1], block)
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
    w.add_expert_shared_count(max(1, cfg.get("n_shared_experts") or 0))  # 0: a zero expert is written
    w.add_leading_dense_block_count(cfg.get("first_k_dense_replace") or 0)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
    w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", True)))
    w.add_nextn_predict_layers(cfg.get("num_nextn_predict_layers") or 0)
    w.add_file_type(FTYPES[qtype])


class _Source:
    """Lazy access to an HF directory's safetensors: shapes without reading, one tensor at a time."""

    def __init__(self, d: Path):
        index = d / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
        elif (d / "model.safetensors").is_file():
            with safe_open(str(d / "model.safetensors"), "pt") as f:
                files = dict.fromkeys(f.keys(), "model.safetensors")  # noqa: SIM118
        else:
            raise ValueError(f"{d}: no model.safetensors or model.safetensors.index.json")
        self.handles = {fn: safe_open(str(d / fn), "pt") for fn in set(files.values())}
        self.files = files

    def shape(self, name: str) -> list[int]:
        return list(self.handles[self.files[name]].get_slice(name).get_shape())

    def get(self, names: list[str], shape: list[int]) -> np.ndarray:
        if names == [ZEROS]:
            return np.zeros(shape, dtype=np.float32)
        ts = [self.handles[self.files[n]].get_tensor(n).float() for n in names]
        return (torch.stack(ts) if EXPERT.match(names[0]) else ts[0]).numpy()


def _encode(arr: np.ndarray, t: gguf.GGMLQuantizationType) -> np.ndarray:
    if t == QT.F32:
        return arr.astype(np.float32)
    if t == QT.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, t)


def _nbytes(shape: list[int], t: gguf.GGMLQuantizationType) -> tuple[list[int], int]:
    """(shape as the writer wants it, bytes): quantized tensors are declared by their uint8 byte shape."""
    if t in (QT.F32, QT.F16):
        return shape, int(np.prod(shape)) * (4 if t == QT.F32 else 2)
    byte_shape = list(gguf.quant_shape_to_byte_shape(tuple(shape), t))
    return byte_shape, int(np.prod(byte_shape))


def export_gguf(hf_dir: str | Path, out_file: str | Path, qtype: str = "q8_0") -> dict:
    """Write `out_file`, streaming one (merged) tensor at a time; returns tensor types and tokenizer kind."""
    if qtype in KQUANTS:
        return _export_kquant(Path(hf_dir), Path(out_file), qtype)
    if qtype not in TYPES:
        raise ValueError(f"--gguf-type {qtype!r} is not one of {sorted([*TYPES, *KQUANTS])}")
    d = Path(hf_dir)
    cfg = read_config(d)
    if cfg.get("n_group", 1) != 1 or cfg.get("topk_group", 1) != 1:
        raise ValueError(f"{d}/config.json: grouped routing (n_group>1) is not exported to GGUF here")
    src = _Source(d)
    plan = plan_tensors(
        {n: src.shape(n) for n in src.files}, cfg["n_routed_experts"], cfg.get("tie_word_embeddings", False)
    )
    name_map = gguf.get_tensor_name_map(ARCH, cfg["num_hidden_layers"])
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[ARCH])
    add_hparams(w, cfg, qtype)
    kind = add_vocab(w, d, cfg["vocab_size"], special_ids(d))
    jobs, types = [], {}
    for target, names in plan.items():
        if names == [ZEROS]:
            ff, hidden = cfg["moe_intermediate_size"], cfg["hidden_size"]
            shape = [hidden, ff] if ".down_proj" in target else [ff, hidden]
        else:
            shape = ([len(names)] if EXPERT.match(names[0]) else []) + src.shape(names[0])
        gname = gguf_name(name_map, target)
        t = pick_type(gname, shape, qtype)
        decl, nbytes = _nbytes(shape, t)
        quant = t not in (QT.F32, QT.F16)
        dtype = np.uint8 if quant else (np.float32 if t == QT.F32 else np.float16)
        w.add_tensor_info(gname, decl, np.dtype(dtype), nbytes, raw_dtype=t if quant else None)
        jobs.append((names, shape, t))
        types[t.name] = types.get(t.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for names, shape, t in jobs:
        w.write_tensor_data(_encode(src.get(names, shape), t))
    w.close()
    return {"gguf_type": qtype, "file": out.name, "tensor_types": types, "tokenizer": kind, "arch": "glm4moe"}


def _export_kquant(hf_dir: Path, out: Path, qtype: str) -> dict:
    try:
        import llama_cpp
    except ImportError:
        raise ValueError(f"--gguf-type {qtype} needs llama-cpp-python (run `make llama-cpp`)") from None
    tmp = out.with_name(out.name + ".f16.tmp")
    try:
        summary = export_gguf(hf_dir, tmp, "f16")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = KQUANTS[qtype]
        params.nthread = 1
        rc = llama_cpp.llama_model_quantize(str(tmp).encode(), str(out).encode(), params)
        if rc != 0:
            raise ValueError(f"llama.cpp could not quantize {tmp} to {qtype} (return code {rc})")
    finally:
        tmp.unlink(missing_ok=True)
    types: dict[str, int] = {}
    for t in gguf.GGUFReader(str(out)).tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {**summary, "gguf_type": qtype, "file": out.name, "tensor_types": types, "quantizer": "llama.cpp"}
