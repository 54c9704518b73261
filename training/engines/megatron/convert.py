"""Weights both ways between kmoe's layout (model/) and megatron-core's GPTModel layout.

megatron fuses what kmoe keeps apart:
  linear_qkv   [G * (H/G + 2) * K, D]: per KV group g, its H/G query heads, then its key head, then its value
               head (megatron's per-group interleaving; TP splits whole groups)
  linear_fc1   [2F, D]: gate rows, then up rows (TP splits each half, so a rank holds [gate_r; up_r])
  experts      one `local_experts.{i}` SequentialMLP per expert (local spec) or `linear_fc1.weight{i}`
               (TEGroupedMLP); on expert-parallel rank r, local expert i is global expert r * E/EP + i
  expert bias  `mlp.router.expert_bias` <-> kmoe `mlp.router.expert_bias` <-> HF `e_score_correction_bias`
Names here are megatron's with global layer and expert numbers, as a one-rank model holds them; TE-spec
names are read too (`canonical_name`). Every conversion checks coverage both ways: a tensor the other side
expects but is missing, or one that has no place, raises ConversionError naming it, so a converter that drops
or overwrites an expert cannot pass unnoticed (Megatron-LM #5844, Megatron-Bridge #1716/#1871).

Shape suffixes: G KV groups, H query heads, K head dim, D hidden, F ffn width.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from model.config import ModelConfig


class ConversionError(ValueError):
    """A state that does not cover, or does not fit, the model it is converted for."""


def fuse_qkv(q_HKD: torch.Tensor, k_GKD: torch.Tensor, v_GKD: torch.Tensor, heads: int, groups: int):
    """kmoe q/k/v projection weights -> megatron's per-group interleaved linear_qkv weight."""
    d = q_HKD.shape[-1]
    q = q_HKD.reshape(groups, heads // groups, -1, d)
    k = k_GKD.reshape(groups, 1, -1, d)
    v = v_GKD.reshape(groups, 1, -1, d)
    return torch.cat([q, k, v], dim=1).reshape(-1, d)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """megatron linear_qkv weight -> (q, k, v) weights in kmoe's layout."""
    d = qkv.shape[-1]
    per = heads // groups
    x = qkv.reshape(-1, per + 2, head_dim, d)  # -1: all groups, or a TP rank's share of them
    q = x[:, :per].reshape(-1, d)
    return q, x[:, per].reshape(-1, d), x[:, per + 1].reshape(-1, d)


# (kmoe suffix, megatron suffix) for tensors that map one to one, within a layer.
_LAYER_ONE_TO_ONE = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn.o_proj.weight", "self_attention.linear_proj.weight"),
    ("mlp_norm.weight", "pre_mlp_layernorm.weight"),
)
_QK_NORM = (
    ("attn.q_norm.weight", "self_attention.q_layernorm.weight"),
    ("attn.k_norm.weight", "self_attention.k_layernorm.weight"),
)

# TransformerEngine spec names -> local spec names (layer-relative, after `decoder.layers.N.`).
_TE_RENAMES = (
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
    (
        re.compile(r"mlp\.experts\.linear_fc(\d)\.weight(\d+)$"),
        r"mlp.experts.local_experts.\2.linear_fc\1.weight",
    ),
)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
EXPERT_NAME = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")


def canonical_name(name: str) -> str | None:
    """Local-spec name of a megatron tensor; None for TE's `_extra_state` (no weights in it)."""
    if name.endswith("_extra_state"):
        return None
    m = _LAYER.match(name)
    if not m:
        return name
    rest = m.group(2)
    for pattern, repl in _TE_RENAMES:
        rest = pattern.sub(repl, rest)
    return f"decoder.layers.{m.group(1)}.{rest}"


class Entry(NamedTuple):
    """kmoe tensors <-> megatron tensors, with the function each way (lists in, lists out)."""

    ours: list[str]
    meg: list[str]
    to_meg: Callable[..., list[torch.Tensor]]
    to_ours: Callable[..., list[torch.Tensor]]
    per_expert: bool = False  # meg names one tensor per global expert (a rank holds some of them)


def _same(*t: torch.Tensor) -> list[torch.Tensor]:
    return list(t)


def _glu(ours_gate: str, ours_up: str, meg_fc1: str) -> Entry:
    return Entry(
        [ours_gate, ours_up],
        [meg_fc1],
        lambda g, u: [torch.cat([g, u], 0)],
        lambda fc1: list(fc1.chunk(2, 0)),
    )


def _layer_map(cfg: ModelConfig, i: int) -> list[Entry]:
    ours, meg = f"layers.{i}.", f"decoder.layers.{i}."
    pairs = list(_LAYER_ONE_TO_ONE) + (list(_QK_NORM) if cfg.qk_norm else [])
    out = [Entry([ours + a], [meg + b], _same, _same) for a, b in pairs]
    h, g, k = cfg.num_heads, cfg.num_kv_heads, cfg.dim_head
    qkv = [ours + f"attn.{p}_proj.weight" for p in "qkv"]
    out.append(Entry(
        qkv, [meg + "self_attention.linear_qkv.weight"],
        lambda q, kk, v: [fuse_qkv(q, kk, v, h, g)], lambda x: list(split_qkv(x, h, g, k)),
    ))  # fmt: skip
    if not cfg.is_moe_layer(i):
        out.append(
            _glu(ours + "mlp.gate_proj.weight", ours + "mlp.up_proj.weight", meg + "mlp.linear_fc1.weight")
        )
        out.append(Entry([ours + "mlp.down_proj.weight"], [meg + "mlp.linear_fc2.weight"], _same, _same))
        return out
    out.append(Entry([ours + "mlp.router.weight"], [meg + "mlp.router.weight"], _same, _same))
    if cfg.router_score == "sigmoid":  # megatron keeps an expert bias only for sigmoid routing
        out.append(Entry([ours + "mlp.router.expert_bias"], [meg + "mlp.router.expert_bias"], _same, _same))
    out += _experts_map(cfg, ours, meg)
    if cfg.num_shared_experts:
        o, m = ours + "mlp.shared.", meg + "mlp.shared_experts."
        out.append(_glu(o + "gate_proj.weight", o + "up_proj.weight", m + "linear_fc1.weight"))
        out.append(Entry([o + "down_proj.weight"], [m + "linear_fc2.weight"], _same, _same))
    return out


def _experts_map(cfg: ModelConfig, ours: str, meg: str) -> list[Entry]:
    """kmoe's stacked [E, ...] expert tensors <-> one megatron tensor per (global) expert."""
    e = cfg.num_experts
    fc1 = [f"{meg}mlp.experts.local_experts.{x}.linear_fc1.weight" for x in range(e)]
    fc2 = [f"{meg}mlp.experts.local_experts.{x}.linear_fc2.weight" for x in range(e)]

    def to_fc1(gate_EFD, up_EFD):
        return [torch.cat([gate_EFD[x], up_EFD[x]], 0) for x in range(e)]

    def from_fc1(*fc1s):
        halves = [t.chunk(2, 0) for t in fc1s]
        return [torch.stack([hh[0] for hh in halves]), torch.stack([hh[1] for hh in halves])]

    return [
        Entry([ours + "mlp.experts.gate_proj", ours + "mlp.experts.up_proj"], fc1, to_fc1, from_fc1, True),
        Entry(
            [ours + "mlp.experts.down_proj"],
            fc2,
            lambda d: list(d.unbind(0)),
            lambda *t: [torch.stack(t)],
            True,
        ),
    ]


def conversion_map(cfg: ModelConfig) -> list[Entry]:
    """Every entry of the whole model, embeddings to LM head."""
    out = [Entry(["embed.weight"], ["embedding.word_embeddings.weight"], _same, _same)]
    for i in range(cfg.num_layers):
        out += _layer_map(cfg, i)
    out.append(Entry(["norm.weight"], ["decoder.final_layernorm.weight"], _same, _same))
    if not cfg.tie_embeddings:
        out.append(Entry(["lm_head.weight"], ["output_layer.weight"], _same, _same))
    return out


def _convert(state: dict[str, torch.Tensor], entries: list[Entry], to_meg: bool) -> dict[str, torch.Tensor]:
    side, other = ("kmoe", "megatron") if to_meg else ("megatron", "kmoe")
    out, used = {}, set()
    for entry in entries:
        names, targets = (entry.ours, entry.meg) if to_meg else (entry.meg, entry.ours)
        missing = [n for n in names if n not in state]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ConversionError(
                f"{side} state lacks '{missing[0]}' (needed for {other} '{targets[0]}'{more})"
            )
        values = (entry.to_meg if to_meg else entry.to_ours)(*(state[n] for n in names))
        for name, value in zip(targets, values, strict=True):
            if name in out:
                raise ConversionError(f"two {side} tensors map onto {other} '{name}'")
            out[name] = value.contiguous()
        used.update(names)
    leftover = sorted(set(state) - used)
    if leftover:
        raise ConversionError(
            f"{side} tensor '{leftover[0]}' has no place in the {other} model ({len(leftover)} unplaced)"
        )
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every kmoe tensor of `cfg` (built on the meta device: no memory)."""
    from model.transformer import MoETransformer

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MoETransformer(cfg).state_dict().items()}


def check_shapes(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor of `state` that the model has must have the model's shape (names the first that differs)."""
    for name, shape in expected_shapes(cfg).items():
        if name in state and tuple(state[name].shape) != shape:
            raise ConversionError(
                f"{where} tensor '{name}' has shape {list(state[name].shape)}, the model needs {list(shape)}"
            )


def to_megatron(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kmoe state -> a one-rank megatron GPTModel state (global layer and expert numbers)."""
    check_shapes(cfg, state, "kmoe")
    if cfg.router_score != "sigmoid":
        bias = [n for n in state if n.endswith("router.expert_bias")]
        if any(state[n].abs().max() > 0 for n in bias):
            raise ConversionError(f"'{bias[0]}' is nonzero but megatron has no bias for softmax routing")
        state = {k: v for k, v in state.items() if k not in bias}
    return _convert(state, conversion_map(cfg), to_meg=True)


def from_megatron(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A one-rank megatron state (local or TE spec names) -> kmoe state."""
    canon = {}
    for name, value in state.items():
        c = canonical_name(name)
        if c is None or value is None:
            continue
        if c in canon:
            raise ConversionError(f"megatron tensors '{name}' and another both map to '{c}'")
        canon[c] = value
    if cfg.tie_embeddings:  # the last pipeline stage's copy of the shared embedding
        canon.pop("output_layer.weight", None)
    out = _convert(canon, conversion_map(cfg), to_meg=False)
    if cfg.router_score != "sigmoid":
        for i in range(cfg.first_k_dense, cfg.num_layers):
            out[f"layers.{i}.mlp.router.expert_bias"] = torch.zeros(cfg.num_experts)
    check_shapes(cfg, out, "converted megatron")
    return out


def globalize(name: str, layer_offset: int, expert_offset: int) -> str:
    """A rank-local megatron name -> the global one (pipeline layer offset, expert-parallel offset)."""
    m = _LAYER.match(name)
    if m:
        name = f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}"
    e = EXPERT_NAME.match(name)
    if e:
        name = f"{e.group(1)}{int(e.group(2)) + expert_offset}{e.group(3)}"
    return name


def merge_rank_states(parts: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Union of globally named per-rank states; an expert given twice is an error, never an overwrite.

    Tensors replicated across ranks (attention, norms, shared experts under EP) must agree exactly.
    """
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, value in part.items():
            if name not in out:
                out[name] = value
            elif EXPERT_NAME.match(name):
                raise ConversionError(f"expert tensor '{name}' comes from two ranks (one would overwrite it)")
            elif not torch.equal(out[name], value):
                raise ConversionError(f"replicated tensor '{name}' differs between ranks")
    return out
