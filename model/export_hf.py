"""Export a kmoe checkpoint to the stock Hugging Face `Glm4MoeForCausalLM` layout.

The export streams: tensors are read one at a time from the checkpoint (a full model.safetensors or the
model/ shard files of a sharded training checkpoint, experts one expert at a time) and written through
kmoe.safetensors_stream into sharded safetensors with an index, so peak memory stays near the largest tensor.
Glm4Moe matches our block exactly: sigmoid router with `e_score_correction_bias` used for selection only,
normalised top-k weights times `routed_scaling_factor`, shared experts, optional dense first layers,
GQA with (partial) NEOX RoPE and optional QK-norm. Experts are written per expert
(`mlp.experts.{e}.gate_proj.weight`, ...), the layout the Hub, vLLM and llama.cpp converters read;
transformers fuses them on load. Options with no Glm4Moe equivalent are refused, never approximated.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kmoe.hashing import (
    LEGACY_SCHEME,
    TENSOR_SCHEME,
    Pieces,
    TensorMeta,
    box_pieces,
    combine_pieces,
    digest_as,
    itemsize,
    layout_digest,
    sha256_file,
)
from kmoe.safetensors_stream import StreamWriter

from .checkpoint import CheckpointError, TensorSource, open_tensors, read_config, read_digests
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


@dataclass(frozen=True)
class HFEntry:
    """One tensor of the export: `src` (kmoe name; None for Glm4Moe's empty shared MLP) whole, or its row
    `index` of dim 0 (one expert of a stacked expert tensor)."""

    name: str
    src: str | None
    index: int | None
    shape: tuple[int, ...]
    keep_fp32: bool = False


def hf_plan(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> list[HFEntry]:
    """Every HF tensor of the export and where it comes from, from the kmoe tensors' shapes alone;
    raises if a kmoe tensor has no Glm4Moe equivalent."""
    used: set[str] = set()
    plan: list[HFEntry] = []

    def take(hf: str, src: str, index: int | None = None, keep_fp32: bool = False) -> None:
        used.add(src)
        shape = tuple(shapes[src])
        plan.append(HFEntry(hf, src, index, shape if index is None else shape[1:], keep_fp32))

    take("model.embed_tokens.weight", "embed.weight")
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        take(hf + "input_layernorm.weight", ours + "attn_norm.weight")
        take(hf + "post_attention_layernorm.weight", ours + "mlp_norm.weight")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            take(f"{hf}self_attn.{p}.weight", f"{ours}attn.{p}.weight")
        if cfg.qk_norm:
            for p in ("q_norm", "k_norm"):
                take(f"{hf}self_attn.{p}.weight", f"{ours}attn.{p}.weight")
        if not cfg.is_moe_layer(i):
            for p in ("gate_proj", "up_proj", "down_proj"):
                take(f"{hf}mlp.{p}.weight", f"{ours}mlp.{p}.weight")
            continue
        take(hf + "mlp.gate.weight", ours + "mlp.router.weight")
        take(hf + "mlp.gate.e_score_correction_bias", ours + "mlp.router.expert_bias", keep_fp32=True)
        for p in ("gate_proj", "up_proj", "down_proj"):
            for e in range(cfg.num_experts):
                take(f"{hf}mlp.experts.{e}.{p}.weight", f"{ours}mlp.experts.{p}", index=e)
        for p in ("gate_proj", "up_proj", "down_proj"):
            if cfg.num_shared_experts:
                take(f"{hf}mlp.shared_experts.{p}.weight", f"{ours}mlp.shared.{p}.weight")
            else:  # Glm4Moe always builds a shared MLP; width 0 makes it an exact no-op
                shape = (cfg.hidden_size, 0) if p == "down_proj" else (0, cfg.hidden_size)
                plan.append(HFEntry(f"{hf}mlp.shared_experts.{p}.weight", None, None, shape))
    take("model.norm.weight", "norm.weight")
    if not cfg.tie_embeddings:
        take("lm_head.weight", "lm_head.weight")
    leftover = sorted(set(shapes) - used)
    if leftover:
        raise ExportError(f"tensors with no Glm4Moe equivalent: {leftover[:5]}")
    return plan


def _fetch(e: HFEntry, read: Callable[[str, int | None], torch.Tensor]) -> torch.Tensor:
    if e.src is None:
        return torch.zeros(e.shape)
    t = read(e.src, e.index)
    return t.float() if e.keep_fp32 else t


def hf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every kmoe tensor of a whole in-memory state."""
    for e in hf_plan(cfg, {k: tuple(v.shape) for k, v in state.items()}):
        yield e.name, _fetch(e, lambda n, i: state[n] if i is None else state[n][i])


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 << 30,
) -> dict:
    """Write a stock-transformers-loadable directory, one tensor at a time (peak memory: about the largest
    tensor, an expert's matrix being read per expert); every source tensor's digest is checked against
    digests.json as it streams through. Returns a summary with file digests."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    cfg, _ = read_config(checkpoint)
    check_exportable(cfg)
    source = open_tensors(checkpoint)
    plan = hf_plan(cfg, {n: source.meta(n)[1] for n in source.names})
    checker = _DigestCheck(Path(checkpoint), source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = _copy_tokenizer(Path(tokenizer_dir), out) if tokenizer_dir else None
    out_dtype = {
        e.name: "float32" if e.keep_fp32 else str(DTYPES[dtype]).removeprefix("torch.") for e in plan
    }
    groups = _shard_groups(plan, out_dtype, max_shard_bytes)
    shards, file_sha = [], {}
    for k, group in enumerate(groups, 1):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        writer = StreamWriter(
            out / fname, [(e.name, out_dtype[e.name], e.shape) for e in group], {"format": "pt"}
        )
        for e in group:
            t = _fetch(e, checker.read)
            writer.add(e.name, t.to(getattr(torch, out_dtype[e.name])).contiguous())
        file_sha[fname], _ = writer.close()
        shards.append(fname)
    checker.finish()
    if len(groups) > 1:
        weight_map = {e.name: shards[k] for k, g in enumerate(groups) for e in g}
        total = sum(_nbytes(e, out_dtype) for e in plan)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype, special), indent=2) + "\n")
    gen = {"do_sample": False, "max_new_tokens": 128}
    if special:
        gen.update({k + "_token_id": v for k, v in special.items() if k in ("bos", "eos", "pad")})
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    size = model_size(cfg)
    files = {p.name: file_sha.get(p.name) or sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}
    return {"out_dir": str(out), "shards": shards, "total_params": size.total, "files": files}


def _nbytes(e: HFEntry, out_dtype: dict[str, str]) -> int:
    return math.prod(e.shape) * itemsize(out_dtype[e.name])


def _shard_groups(plan: list[HFEntry], out_dtype: dict[str, str], max_bytes: int) -> list[list[HFEntry]]:
    groups: list[list[HFEntry]] = [[]]
    size = 0
    for e in plan:
        n = _nbytes(e, out_dtype)
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += n
    return groups


class _DigestCheck:
    """Checks every source tensor against digests.json from the reads the export makes anyway: whole
    tensors, or rows of a stacked expert tensor whose digest pieces combine once all rows went by."""

    def __init__(self, path: Path, source: TensorSource):
        self.path, self.source = path, source
        record = read_digests(path)
        self.recorded, self.scheme = record["tensors"], record.get("scheme", LEGACY_SCHEME)
        self.pieces: dict[str, list[Pieces]] = {}
        self.seen: set[str] = set()

    def read(self, name: str, index: int | None) -> torch.Tensor:
        t = self.source.read(name, index)
        dtype, shape = self.source.meta(name)
        if self.scheme != TENSOR_SCHEME:  # whole-tensor sha256: read it whole once more to check it
            if name not in self.seen:
                self._check(name, digest_as(self.source.read(name), self.scheme))
        elif index is None:
            self._check(name, layout_digest(t))
        else:
            meta = TensorMeta(dtype, tuple(shape))
            self.pieces.setdefault(name, []).append(
                box_pieces(meta, (index,) + (0,) * (len(shape) - 1), t[None])
            )
            if len(self.pieces[name]) == shape[0]:
                self._check(name, combine_pieces(self.pieces.pop(name)))
        self.seen.add(name)
        return t

    def _check(self, name: str, digest: str) -> None:
        if self.recorded.get(name) != digest:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' does not match its recorded digest ({self.scheme})"
            )

    def finish(self) -> None:
        missing = sorted(set(self.recorded) - self.seen) or sorted(self.pieces)
        if missing:
            raise CheckpointError(f"{self.path}: tensors {missing[:5]} were not all read for the export")


def _copy_tokenizer(src: Path, out: Path) -> dict[str, int]:
    """Copy our HF tokenizer files; return the special token ids recorded beside them."""
    if not (src / "tokenizer.json").is_file():
        raise ExportError(f"{src}: no tokenizer.json (train one with `kmoe tokenizer train`)")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    meta = src / "kmoe_tokenizer.json"
    return json.loads(meta.read_text()).get("special_ids", {}) if meta.is_file() else {}
