"""`kmoe quantize`: SOURCE (kmoe checkpoint or HF export) -> a signed artifact directory for one method."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import calibration as C
from .hfdir import require_tokenizer, resolve_source, source_tokenizer
from .manifest import ledger_head, sign_artifact, source_digest
from .modelcard import model_card

log = logging.getLogger(__name__)
METHODS = ("gptq", "gguf", "nf4", "int8")


@dataclass
class QuantizeOptions:
    method: str
    bits: int = 4
    group_size: int = 128
    gguf_type: str = "q4_0"
    calib: list[str] = field(default_factory=list)
    mix: str | None = None
    num_samples: int = 64
    seq_len: int = 256
    calibrate_all_experts: bool = True
    min_expert_tokens: int = 1
    quantize_lm_head: bool = False
    quantize_embedding: bool = False
    tokenizer: str | None = None
    key: str | None = None
    force: bool = False


def check_options(opts: QuantizeOptions, out: Path) -> None:
    """Everything that can be wrong with the request, before any model is loaded."""
    if opts.method not in METHODS:
        raise ValueError(f"--method {opts.method!r} is not one of {METHODS}")
    if opts.method != "gptq" and (opts.quantize_lm_head or opts.quantize_embedding):
        raise ValueError("--quantize-lm-head / --quantize-embedding apply to --method gptq only")
    if opts.method == "gptq" and not opts.calib:
        raise ValueError("--method gptq needs --calib PATH (held-out text .jsonl/.txt or a shards dir)")
    for p in opts.calib:
        if not Path(p).exists():
            raise ValueError(f"--calib {p}: no such file or directory")
    if out.exists() and any(out.iterdir()):
        if not opts.force:
            raise ValueError(f"OUT_DIR {out} exists and is not empty (pass --force to overwrite)")
        if not (out / "quantization.json").is_file():
            raise ValueError(
                f"OUT_DIR {out}: --force only replaces a previous kmoe artifact (no quantization.json)"
            )
    C.parse_mix(opts.mix)


def quantize(source: str | Path, out_dir: str | Path, opts: QuantizeOptions) -> dict:
    """Quantize, then write quantization.json, README.md and the signed manifest; returns quantization.json."""
    out = Path(out_dir)
    check_options(opts, out)
    source_tokenizer(Path(source), opts.tokenizer)  # a tokenizer problem fails before any model loads
    if out.exists():
        shutil.rmtree(out)  # a previous artifact (checked above): no stale file may enter the new manifest
    out.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory(prefix="kmoe-quant-") as work:
            hf = resolve_source(source, Path(work), opts.tokenizer)
            require_tokenizer(hf)
            params, calib = _run_method(hf, out, opts)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-written artifact that looks like a result
        raise
    qjson = {
        "method": opts.method,
        "params": params,
        "calibration": calib,
        "source": {k: v for k, v in source_digest(source).items() if k != "files"},
        "ledger_head": ledger_head(source),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (out / "quantization.json").write_text(json.dumps(qjson, indent=1, ensure_ascii=False) + "\n")
    files = sorted(p.name for p in out.iterdir())
    (out / "README.md").write_text(model_card(opts.method, qjson, files), encoding="utf-8")
    manifest = sign_artifact(out, qjson["source"], qjson["ledger_head"], opts.key)
    log.info("signed %d files in %s", len(manifest["files"]), out)
    return qjson


def _run_method(hf: Path, out: Path, opts: QuantizeOptions) -> tuple[dict, dict | None]:
    if opts.method == "gguf":
        from .gguf_export import export_gguf

        return export_gguf(hf, out / f"model-{opts.gguf_type}.gguf", opts.gguf_type), None
    if opts.method in ("nf4", "int8"):
        from .bnb import quantize_bnb

        return quantize_bnb(hf, out, opts.method), None
    from transformers import AutoTokenizer

    from .gptq import quantize_gptq

    mix = C.parse_mix(opts.mix)
    docs = C.read_docs(opts.calib, part="calib")  # shards: never the documents eval reads
    seqs = C.token_sequences(
        docs, AutoTokenizer.from_pretrained(str(hf)), opts.seq_len, opts.num_samples, mix
    )
    flat = [s for lang in sorted(seqs) for s in seqs[lang]]
    params = quantize_gptq(
        hf, out, flat, bits=opts.bits, group_size=opts.group_size,
        calibrate_all_experts=opts.calibrate_all_experts, ignore_lm_head=not opts.quantize_lm_head,
        min_expert_tokens=opts.min_expert_tokens, embedding_int8=opts.quantize_embedding,
    )  # fmt: skip
    return params, C.docs_record(docs, seqs, mix)
