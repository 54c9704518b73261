"""README.md model card (Hugging Face front matter + how to load, what was quantized, provenance)."""

from __future__ import annotations

import yaml

LOADERS = {
    "gptq": (
        "transformers",
        "Stock `transformers` loads it (install `compressed-tensors`); vLLM serves the same format.\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH)\ntok = AutoTokenizer.from_pretrained(PATH)\n```",
    ),
    "gguf": (
        "gguf",
        "For llama.cpp (GLM4_MOE architecture, tokenizer embedded):\n\n"
        "```sh\nllama-cli -m {file} -p '안녕하세요'\n```\n\n"
        "or `llama_cpp.Llama(model_path='{file}')` from `llama-cpp-python`.\n\n"
        "**CPUs with AMX** (`amx_int8` in /proc/cpuinfo, e.g. Xeon Sapphire Rapids and later): some llama.cpp "
        "builds crash (SIGSEGV or SIGILL) decoding q8_0/q4_0 files while weights are repacked for AMX "
        "(ggml-org/llama.cpp#20824). If yours does, turn repacking off: `llama-cli --no-repack ...`; in "
        "`llama-cpp-python`, `Llama(use_extra_bufts=False)` is silently ignored, so set it on the model "
        "parameters instead (`quantize.llamacpp.open_llama` in kmoe does this, and does it by default on AMX "
        "CPUs):\n\n"
        "```python\nimport llama_cpp, llama_cpp.llama_cpp as C\ndefault = C.llama_model_default_params\n"
        "def no_repack():\n    p = default()\n    p.use_extra_bufts = False\n    return p\n"
        "C.llama_model_default_params = no_repack\nllm = llama_cpp.Llama(model_path='{file}')\n```",
    ),
    "bnb": (
        "kmoe",
        "**Stock `transformers` cannot load this artifact.** `BitsAndBytesConfig` quantizes only `nn.Linear`, "
        "and Glm4Moe keeps its experts as fused 3-D tensors, which would stay in 16 bits. Here every expert "
        "matrix is quantized with bitsandbytes; load it with the kmoe loader, which builds a stock "
        "`Glm4MoeForCausalLM` whose linear layers and experts keep the quantized bytes:\n\n"
        "```python\nfrom quantize.bnb import load_bnb\nmodel = load_bnb(PATH)  # then model.generate(...)\n```",
    ),
}


def model_card(method: str, qjson: dict, files: list[str]) -> str:
    family = "bnb" if method in ("nf4", "int8") else method
    library, how = LOADERS[family]
    params = qjson["params"]
    bits = {"gptq": f"{params.get('bits', 4)}-bit", "nf4": "4-bit", "int8": "8-bit"}.get(method)
    bits = bits or str(params.get("gguf_type"))
    front = {
        "license": "apache-2.0",
        "library_name": library,
        "pipeline_tag": "text-generation",
        "language": ["ko", "en", "ja"],
        "tags": ["kmoe", "moe", "glm4_moe", "quantized", method, bits],
    }
    gguf_file = next((f for f in files if f.endswith(".gguf")), "model.gguf")
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(),
        "---",
        "",
        f"# kmoe Glm4Moe, {method} ({bits})",
        "",
        "A quantized serving artifact of a kmoe mixture-of-experts model trained from scratch "
        "(Korean-first, multilingual). Produced by `kmoe quantize`.",
        "",
        "## Load",
        "",
        how.replace("{file}", gguf_file),
        "",
        "## Quantization",
        "",
        *[f"- {k}: `{v}`" for k, v in params.items() if not isinstance(v, dict | list)],
        *_kept(method, params),
        "",
        *_expert_table(params),
        "## Tokenizer",
        "",
        _tokenizer_note(method, params),
        "",
        "## Provenance",
        "",
        f"- source: `{qjson['source']['kind']}` with Merkle root `{qjson['source']['merkle_root']}`",
        f"- training ledger head: `{qjson.get('ledger_head')}`",
        "- `manifest.json` lists the sha256 of every file; `manifest.sig` is an Ed25519 signature over it by "
        "the key in `signing_key.pub`. Check with `kmoe quantize verify DIR [--pubkey PEM]`.",
        "",
        "Quality (perplexity per language vs the unquantized model, bytes, tokens/s): "
        "`kmoe quantize eval SOURCE DIR --eval-data ...`.",
        "",
    ]
    return "\n".join(lines)


def _kept(method: str, params: dict) -> list[str]:
    if method == "gptq":
        head = "lm_head, " if "lm_head" in params.get("ignored", []) else ""
        emb = params.get("embedding", "bf16") == "bf16"
        kept = [
            f"- kept in 16/32 bits: router (`mlp.gate`) and its correction bias, norms, "
            f"{'token embedding, ' if emb else ''}{head}zero-width layers; every expert and every other Linear "
            "is quantized"
        ]
        if not emb:
            kept.append(
                "- token embedding: int8 per row (compressed-tensors `int-quantized`). Stock `transformers` loads "
                "it; whether vLLM does is not verified: for vLLM, quantize without `--quantize-embedding`"
            )
        return kept
    if method in ("nf4", "int8"):
        return [
            "- kept in fp32: router (`mlp.gate`) and its correction bias, norms; everything else, every "
            "expert included, is quantized"
        ]
    return ["- kept in F32: router (`ffn_gate_inp`), `exp_probs_b`, norms"]


def _tokenizer_note(method: str, params: dict) -> str:
    if method == "gguf":
        kind = params.get("tokenizer")
        what = {"llama": "the sentencepiece model's pieces, scores, token types and unk/bos/eos/pad ids, exactly",
                "gpt2": "tokenizer.json's byte-level BPE vocabulary and merges"}.get(kind, "the tokenizer")  # fmt: skip
        return f"Embedded in the GGUF file: {what}, from the source model's tokenizer."
    return (
        "The tokenizer files are the source model's, byte for byte (from a kmoe checkpoint: its training run's "
        "tokenizer, checked against the run's ledger)."
    )


def _expert_table(params: dict) -> list[str]:
    routed = params.get("routed_tokens_per_expert")
    if not routed:
        return []
    n = len(next(iter(routed.values())))
    head = "| layer | " + " | ".join(f"e{e}" for e in range(n)) + " |"
    rows = [f"| {k} | " + " | ".join(str(c) for c in v) + " |" for k, v in routed.items()]
    note = (
        "Every expert was calibrated on all calibration tokens (all-expert calibration)."
        if params.get("calibrate_all_experts")
        else "Experts were calibrated on the tokens routed to them only."
    )
    return [
        "Calibration tokens routed to each expert:",
        "",
        head,
        "|" + "---|" * (n + 1),
        *rows,
        "",
        note,
        "",
    ]
