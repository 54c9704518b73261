"""GPTQ W4A16 (compressed-tensors format) through llm-compressor's `oneshot`, MoE-aware.

llm-compressor splits the fused Glm4Moe experts into per-expert Linear modules ("post-load linearization")
and, with `moe_calibrate_all_experts`, sends every calibration token through every expert while the model's
output still uses the routed experts only; so an expert the router never picks still gets a Hessian.
We count the routed tokens per expert beforehand and report them; with all-expert calibration off, an expert
left without routed tokens is an error, since GPTQ would then quantize it with no data at all.
The router (`mlp.gate`), norms and (by default) the token embedding and lm_head stay in the source precision.

`embedding_int8` stores the token embedding as per-row symmetric int8 in compressed-tensors' `int-quantized`
format, which stock `transformers` loads (the packed int4 format it cannot: that layout drops `weight`, which
transformers' Embedding init reads). GPTQ has no Hessian for a lookup table, so this is plain per-row
rounding; llm-compressor's sequential pipeline never observes the embedding, so we set its scale ourselves.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .calibration import CalibrationError, count_expert_tokens, starved_experts
from .hfdir import copy_tokenizer_files

log = logging.getLogger(__name__)
IGNORE = ["re:.*mlp\\.gate$", "lm_head"]
EMBED_TARGET = (
    "re:.*embed_tokens$"  # a regex target: transformers picks the experts' scheme from class targets
)


def check_group_size(model: torch.nn.Module, group_size: int, ignore_lm_head: bool) -> None:
    """Every quantized Linear's input width must be a multiple of the group size."""
    if group_size <= 0:
        raise ValueError(f"--group-size must be > 0, got {group_size}")
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or (ignore_lm_head and name == "lm_head"):
            continue
        if mod.in_features % group_size:
            raise ValueError(
                f"--group-size {group_size} does not divide {name}.in_features={mod.in_features}; "
                "pick a divisor of hidden_size and moe_intermediate_size"
            )


def check_untied(model: torch.nn.Module, ignore_lm_head: bool, embedding_int8: bool) -> None:
    """lm_head and the token embedding are quantized apart (int4 GPTQ, int8 rounding): neither may be tied."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    if not ignore_lm_head:
        raise ValueError("--quantize-lm-head: lm_head is tied to the token embedding, which stays 16-bit")
    if embedding_int8:
        raise ValueError(
            "--quantize-embedding: the token embedding is tied to lm_head, which GPTQ quantizes apart"
        )


def ignored_modules(model: torch.nn.Module, ignore_lm_head: bool) -> list[str]:
    """Router, (lm_head), and zero-width Linears (Glm4Moe's no-op shared expert when a model has none)."""
    empty = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight.numel() == 0]
    return (IGNORE if ignore_lm_head else IGNORE[:1]) + empty


def quantize_embedding_int8(model: torch.nn.Module) -> None:
    """Attach a per-row int8 scheme to the token embedding with scales from its own min/max (no calibration)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization
    from compressed_tensors.quantization.utils import calculate_qparams

    emb = model.get_input_embeddings()
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    initialize_module_for_quantization(
        emb, QuantizationScheme(targets=[EMBED_TARGET], weights=args, format="int-quantized")
    )
    w = emb.weight.data
    scale, zero_point = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    emb.weight_scale.data.copy_(scale)
    if hasattr(emb, "weight_zero_point"):
        emb.weight_zero_point.data.copy_(zero_point)
    emb.quantization_status = QuantizationStatus.FROZEN


def recipe(bits: int, group_size: int, ignore: list[str], dampening: float = 0.01):
    from llmcompressor.modifiers.quantization import GPTQModifier

    if bits not in (4, 8):
        raise ValueError(f"--bits {bits}: GPTQ here supports 4 or 8 bit weights")
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": group_size,
    }
    return GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=ignore,
        dampening_frac=dampening,
    )


def quantize_gptq(
    hf_dir: str | Path,
    out_dir: str | Path,
    sequences: list[list[int]],
    bits: int = 4,
    group_size: int = 32,
    calibrate_all_experts: bool = True,
    ignore_lm_head: bool = True,
    min_expert_tokens: int = 1,
    embedding_int8: bool = False,
) -> dict:
    """Write a compressed-tensors GPTQ artifact to `out_dir`; returns params and per-expert token counts."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kmoe.quiet import quiet_import_llmcompressor

    oneshot = quiet_import_llmcompressor().oneshot  # its loguru output into our logging, known noise dropped

    if os.environ.get("OMP_NUM_THREADS") != "1":
        log.warning("OMP_NUM_THREADS is not 1: GPTQ on a small CPU crawls with thread oversubscription")
    if not sequences:
        raise CalibrationError("no calibration sequences")
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    check_group_size(model, group_size, ignore_lm_head)
    check_untied(model, ignore_lm_head, embedding_int8)
    ignore = ignored_modules(model, ignore_lm_head)
    routed = count_expert_tokens(model, sequences)
    starved = starved_experts(routed, min_expert_tokens)
    if starved and not calibrate_all_experts:
        raise CalibrationError(
            f"calibration routed fewer than {min_expert_tokens} token(s) to {len(starved)} expert(s): "
            f"{starved[:8]}; GPTQ would quantize them from (almost) no data. Calibrate all experts (the default) "
            "or add calibration text that reaches them"
        )
    if starved:
        log.warning(
            "router sends < %d calibration tokens to %s; calibrating them on all tokens",
            min_expert_tokens,
            starved,
        )
    ds = Dataset.from_dict({"input_ids": sequences, "attention_mask": [[1] * len(s) for s in sequences]})
    oneshot(
        model=model,
        tokenizer=tok,
        dataset=ds,
        recipe=recipe(bits, group_size, ignore),
        max_seq_length=max(map(len, sequences)),
        num_calibration_samples=len(sequences),
        shuffle_calibration_samples=False,
        moe_calibrate_all_experts=calibrate_all_experts,
        pipeline="sequential",
    )
    if embedding_int8:
        quantize_embedding_int8(model)
    out = Path(out_dir)
    model.to(torch.bfloat16)
    model.save_pretrained(str(out), save_compressed=True)
    copy_tokenizer_files(hf_dir, out)
    total = sum(map(len, sequences))
    return {
        "scheme": f"W{bits}A16",
        "bits": bits,
        "group_size": group_size,
        "symmetric": True,
        "format": "compressed-tensors (pack-quantized)",
        "calibrate_all_experts": calibrate_all_experts,
        "ignored": ignore,
        "embedding": "int8 per-row (int-quantized)" if embedding_int8 else "bf16",
        "calibration_tokens": total,
        "routed_tokens_per_expert": routed,
        "calibrated_tokens_per_expert": (
            {k: [total] * len(v) for k, v in routed.items()} if calibrate_all_experts else routed
        ),
        "min_expert_tokens": min_expert_tokens,
        "starved_experts_fixed": starved,
    }
