"""Export a kmoe checkpoint to the stock Hugging Face `Glm4MoeForCausalLM` layout.

Glm4Moe matches our block exactly: sigmoid router with `e_score_correction_bias` used for selection only,
normalised top-k weights times `routed_scaling_factor`, shared experts, optional dense first layers,
GQA with (partial) NEOX RoPE and optional QK-norm. Experts are written per expert
(`mlp.experts.{e}.gate_proj.weight`, ...), the layout the Hub, vLLM and llama.cpp converters read;
transformers fuses them on load. Options with no Glm4Moe equivalent are refused, never approximated.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from kmoe.hashing import sha256_file

from .checkpoint import load_model_dir
from .config import ModelConfig
from .params import model_size

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


class ExportError(ValueError):
    """The checkpoint cannot be expressed as a stock Glm4Moe model."""


def check_exportable(cfg: ModelConfig) -> None:
    if cfg.router_score != "sigmoid":
        raise ExportError(
            f"model.router_score={cfg.router_score!r}: Glm4Moe routes with sigmoid scores only; "
            "exporting would give a model that computes something else"
        )
    if cfg.num_experts < 2:
        raise ExportError("model.num_experts < 2: Glm4Moe's grouped top-k needs at least 2 experts per group")


def hf_config(cfg: ModelConfig, dtype: str, special_ids: dict[str, int] | None = None) -> dict:
    ids = special_ids or {}
    return {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.dense_intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.rotary_fraction,
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_qk_norm": cfg.qk_norm,
        "first_k_dense_replace": cfg.first_k_dense,
        "moe_intermediate_size": cfg.expert_intermediate_size,
        "n_routed_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_shared_experts": cfg.num_shared_experts,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": cfg.norm_topk_prob,
        "n_group": 1,
        "topk_group": 1,
        "num_nextn_predict_layers": 0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("pad"),
        "dtype": dtype,
    }


def hf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every kmoe tensor; raises if a tensor has no mapping."""
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return state[name]

    yield "model.embed_tokens.weight", take("embed.weight")
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        yield hf + "input_layernorm.weight", take(ours + "attn_norm.weight")
        yield hf + "post_attention_layernorm.weight", take(ours + "mlp_norm.weight")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{hf}self_attn.{p}.weight", take(f"{ours}attn.{p}.weight")
        if cfg.qk_norm:
            for p in ("q_norm", "k_norm"):
                yield f"{hf}self_attn.{p}.weight", take(f"{ours}attn.{p}.weight")
        if not cfg.is_moe_layer(i):
            for p in ("gate_proj", "up_proj", "down_proj"):
                yield f"{hf}mlp.{p}.weight", take(f"{ours}mlp.{p}.weight")
            continue
        yield hf + "mlp.gate.weight", take(ours + "mlp.router.weight")
        yield hf + "mlp.gate.e_score_correction_bias", take(ours + "mlp.router.expert_bias").float()
        for p in ("gate_proj", "up_proj", "down_proj"):
            stacked = take(f"{ours}mlp.experts.{p}")
            for e in range(cfg.num_experts):
                yield f"{hf}mlp.experts.{e}.{p}.weight", stacked[e]
        for p in ("gate_proj", "up_proj", "down_proj"):
            if cfg.num_shared_experts:
                yield f"{hf}mlp.shared_experts.{p}.weight", take(f"{ours}mlp.shared.{p}.weight")
            else:  # Glm4Moe always builds a shared MLP; width 0 makes it an exact no-op
                shape = (cfg.hidden_size, 0) if p == "down_proj" else (0, cfg.hidden_size)
                yield f"{hf}mlp.shared_experts.{p}.weight", torch.zeros(shape)
    yield "model.norm.weight", take("norm.weight")
    if not cfg.tie_embeddings:
        yield "lm_head.weight", take("lm_head.weight")
    leftover = sorted(set(state) - used)
    if leftover:
        raise ExportError(f"tensors with no Glm4Moe equivalent: {leftover[:5]}")


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 << 30,
) -> dict:
    """Write a stock-transformers-loadable directory; returns a summary with file digests."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    cfg, state = load_model_dir(checkpoint, verify=True)
    check_exportable(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = _copy_tokenizer(Path(tokenizer_dir), out) if tokenizer_dir else None
    tensors = {}
    for name, t in hf_tensors(cfg, state):
        keep_fp32 = name.endswith("e_score_correction_bias")
        tensors[name] = t.to(torch.float32 if keep_fp32 else DTYPES[dtype]).contiguous().clone()
    shards = _write_shards(tensors, out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype, special), indent=2) + "\n")
    gen = {"do_sample": False, "max_new_tokens": 128}
    if special:
        gen.update({k + "_token_id": v for k, v in special.items() if k in ("bos", "eos", "pad")})
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    size = model_size(cfg)
    return {
        "out_dir": str(out),
        "shards": shards,
        "total_params": size.total,
        "files": {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()},
    }


def _write_shards(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int) -> list[str]:
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    if len(groups) == 1:
        save_file(groups[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, g in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(g, str(out / fname), metadata={"format": "pt"})
        names.append(fname)
        weight_map.update(dict.fromkeys(g, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def _copy_tokenizer(src: Path, out: Path) -> dict[str, int]:
    """Copy our HF tokenizer files; return the special token ids recorded beside them."""
    if not (src / "tokenizer.json").is_file():
        raise ExportError(f"{src}: no tokenizer.json (train one with `kmoe tokenizer train`)")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    meta = src / "kmoe_tokenizer.json"
    return json.loads(meta.read_text()).get("special_ids", {}) if meta.is_file() else {}
