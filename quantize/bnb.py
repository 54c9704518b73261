"""bitsandbytes NF4 / int8 artifacts with EVERY expert quantized, and the loader that runs them.

transformers' BitsAndBytesConfig quantizes nn.Linear only; Glm4Moe in transformers 5 keeps its experts as fused
3-D parameters, so they would stay in 16 bits. We quantize each expert matrix ourselves with bitsandbytes'
own functions (NF4 blocks of 64 with an fp32 absmax each; int8 row-wise with an fp32 scale), store them in
`kmoe-bnb.safetensors`, and `load_bnb(dir)` builds a stock Glm4MoeForCausalLM whose Linear layers and expert
collections keep the quantized bytes in memory and dequantize per call. Stock `from_pretrained` cannot load
this file (the model card says so). Router, its correction bias and norms stay fp32; the token embedding is
stored quantized and dequantized once at load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

log = logging.getLogger(__name__)
WEIGHTS = "kmoe-bnb.safetensors"
BLOCK = 64


def _keep_fp(name: str) -> bool:
    return name.endswith("norm.weight") or ".mlp.gate." in name or name.endswith("e_score_correction_bias")


def quantize_tensor(w: torch.Tensor, method: str) -> dict[str, torch.Tensor]:
    import bitsandbytes.functional as bf

    w = w.float().contiguous()
    if method == "nf4":
        q, st = bf.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4")
        return {"": q, ".absmax": st.absmax.float(), ".quant_map": st.code.float()}
    if method == "int8":
        q, scb, _ = bf.int8_vectorwise_quant(w)
        return {"": q, ".SCB": scb.float()}
    raise ValueError(f"bnb method {method!r} is not nf4 or int8")


def dequantize(parts: dict[str, torch.Tensor], shape: tuple[int, ...], method: str) -> torch.Tensor:
    import bitsandbytes.functional as bf

    if method == "nf4":
        st = bf.QuantState(
            absmax=parts[".absmax"], shape=torch.Size(shape), code=parts[".quant_map"],
            blocksize=BLOCK, quant_type="nf4", dtype=torch.float32,
        )  # fmt: skip
        return bf.dequantize_4bit(parts[""], st)
    return bf.int8_vectorwise_dequant(parts[""], parts[".SCB"]).reshape(shape)


def quantize_bnb(hf_dir: str | Path, out_dir: str | Path, method: str) -> dict:
    """Quantize every 2-D weight of an HF Glm4Moe dir (experts, shared experts, attention, embeddings, lm_head),
    one source shard at a time: `kmoe-bnb.safetensors`, or `kmoe-bnb-0000i-of-0000n.safetensors` per source shard."""
    from .hfdir import copy_side_files, shard_files

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"quantized": 0, "kept": 0, "experts_quantized": 0}
    files = shard_files(hf_dir)
    for i, fn in enumerate(files, 1):
        tensors, shapes = {}, {}
        with safe_open(str(Path(hf_dir) / fn), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                w = f.get_tensor(name)
                if w.ndim != 2 or _keep_fp(name) or w.numel() == 0:
                    tensors[name] = w.float() if _keep_fp(name) else w
                    counts["kept"] += 1
                    continue
                for suffix, t in quantize_tensor(w, method).items():
                    tensors[name + suffix] = t
                shapes[name] = list(w.shape)
                counts["quantized"] += 1
                counts["experts_quantized"] += ".mlp.experts." in name
        meta = {"method": method, "blocksize": str(BLOCK), "shapes": json.dumps(shapes)}
        name = (
            WEIGHTS
            if len(files) == 1
            else WEIGHTS.replace(".safetensors", f"-{i:05d}-of-{len(files):05d}.safetensors")
        )
        save_file(tensors, str(out / name), metadata=meta)
    copy_side_files(hf_dir, out)
    return {"method": method, "blocksize": BLOCK if method == "nf4" else None, "files": len(files), **counts}


def _read_artifact(d: Path) -> tuple[str, dict[str, list[int]], dict[str, torch.Tensor]]:
    files = sorted(d.glob("kmoe-bnb*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no {WEIGHTS}; not a kmoe bitsandbytes artifact")
    methods, shapes, raw = set(), {}, {}
    for fn in files:
        with safe_open(str(fn), "pt") as f:
            meta = f.metadata()
            methods.add(meta["method"])
            shapes.update(json.loads(meta["shapes"]))
            raw.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    if len(methods) != 1:
        raise ValueError(f"{d}: weight files disagree on the method: {sorted(methods)}")
    return methods.pop(), shapes, raw


class QuantLinear(nn.Module):
    """A Linear whose weight stays quantized in memory and is dequantized per call."""

    def __init__(self, parts: dict[str, torch.Tensor], shape, method: str, dtype: torch.dtype):
        super().__init__()
        self.method, self.shape, self.dtype = method, tuple(shape), dtype
        for k, v in parts.items():
            self.register_buffer("q" + k.replace(".", "_"), v)
        self.keys = list(parts)

    def parts(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, "q" + k.replace(".", "_")) for k in self.keys}

    def weight_fp(self) -> torch.Tensor:
        return dequantize(self.parts(), self.shape, self.method).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_fp().to(x.dtype))


class QuantExperts(nn.Module):
    """Drop-in for Glm4MoeExperts with per-expert quantized gate/up/down matrices."""

    def __init__(self, experts: list[dict[str, QuantLinear]], act_fn):
        super().__init__()
        self.num_experts = len(experts)
        self.experts = nn.ModuleList(nn.ModuleDict(e) for e in experts)
        self.act_fn = act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
            pos, tok = torch.where(mask[e])
            ex = self.experts[e]
            x = hidden_states[tok]
            h = ex["down_proj"](self.act_fn(ex["gate_proj"](x)) * ex["up_proj"](x))
            out.index_add_(0, tok, (h * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def load_bnb(artifact_dir: str | Path, dtype: torch.dtype = torch.float32):
    """Build a stock Glm4MoeForCausalLM from a kmoe bnb artifact, quantized weights kept quantized."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(artifact_dir)
    method, shapes, raw = _read_artifact(d)
    config = AutoConfig.from_pretrained(str(d))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    q = {
        n: QuantLinear({s: raw.pop(n + s) for s in _suffixes(raw, n)}, shapes[n], method, dtype)
        for n in shapes
    }
    for name, mod in list(model.named_modules()):
        if type(mod).__name__.endswith("Experts") and hasattr(mod, "gate_up_proj"):
            experts = [
                {p: q.pop(f"{name}.{e}.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")}
                for e in range(mod.num_experts)
            ]
            _set(model, name, QuantExperts(experts, mod.act_fn))
        elif isinstance(mod, nn.Linear) and name + ".weight" in q:
            _set(model, name, q.pop(name + ".weight"))
    emb = "model.embed_tokens.weight"
    if emb in q:
        raw[emb] = q.pop(emb).weight_fp()
    if q:
        raise ValueError(f"{d}: quantized tensors with no module in the model: {sorted(q)[:5]}")
    model.load_state_dict({k: v.to(torch.float32 if k.endswith("bias") else dtype) for k, v in raw.items()},
                          strict=False, assign=True)  # fmt: skip
    if config.tie_word_embeddings:
        model.tie_weights()
    _init_rope(model, config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{d}: no weights for {left[:5]}")
    return model.eval()


def _suffixes(raw: dict[str, torch.Tensor], name: str) -> list[str]:
    return [
        k[len(name) :]
        for k in raw
        if k == name or (k.startswith(name + ".") and k.count(".") == name.count(".") + 1)
    ]


def _init_rope(model, config) -> None:
    """Rotary inv_freq buffers are not saved; rebuild them on CPU (the model was built on meta)."""
    for name, mod in model.named_modules():
        if type(mod).__name__.endswith("RotaryEmbedding"):
            _set(model, name, type(mod)(config=config))
