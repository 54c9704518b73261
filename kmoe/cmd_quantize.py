"""`kmoe quantize --method M SOURCE OUT_DIR`, `kmoe quantize verify DIR`, `kmoe quantize eval SOURCE ART...`."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import tempfile
from pathlib import Path

from kmoe.output import emit

USAGE = """kmoe quantize --method {gptq,gguf,nf4,int8} [options] SOURCE OUT_DIR
       kmoe quantize verify OUT_DIR [--pubkey PEM]
       kmoe quantize eval SOURCE ARTIFACT... --eval-data PATH [--json FILE]"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantized serving artifacts (GPTQ, GGUF, bitsandbytes)", usage=USAGE)
    p.add_argument(
        "args", nargs="+", metavar="ARG", help="SOURCE OUT_DIR | verify DIR | eval SOURCE ARTIFACT..."
    )
    p.add_argument("--method", choices=["gptq", "gguf", "nf4", "int8"])
    p.add_argument("--bits", type=int, default=4, help="GPTQ weight bits (4 or 8)")
    p.add_argument("--group-size", type=int, default=128, help="GPTQ group size; must divide layer widths")
    p.add_argument("--gguf-type", default="q4_0",
                   choices=["f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q4_k_m", "q5_k_m", "q6_k"],
                   help="K-quants (q4_k_m, ...) are made by llama.cpp itself: `make llama-cpp` first")  # fmt: skip
    p.add_argument("--calib", action="append", default=[], metavar="PATH",
                   help="calibration text: .jsonl(.gz) {text,lang}, .txt, or a <lang>.bin/.idx shards dir")  # fmt: skip
    p.add_argument("--mix", help="language mix for calibration, e.g. ko=0.5,en=0.2,ja=0.2,code=0.1")
    p.add_argument("--num-samples", type=int, default=64, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=256, help="calibration/eval sequence length")
    p.add_argument("--no-calibrate-all-experts", dest="calibrate_all_experts", action="store_false",
                   help="calibrate each expert only on tokens routed to it (fails if one gets none)")  # fmt: skip
    p.add_argument("--min-expert-tokens", type=int, default=1,
                   help="routed calibration tokens each expert needs (checked when not calibrating all experts)")  # fmt: skip
    p.add_argument("--quantize-lm-head", action="store_true", help="GPTQ: quantize lm_head too")
    p.add_argument("--quantize-embedding", action="store_true",
                   help="GPTQ: store the token embedding as per-row int8 (stock transformers loads it; "
                   "vLLM not verified)")  # fmt: skip
    p.add_argument("--tokenizer", help="tokenizer dir to embed (needed when SOURCE has none)")
    p.add_argument(
        "--key", help="Ed25519 private key PEM to sign with (created if absent); default ephemeral"
    )
    p.add_argument("--force", action="store_true", help="overwrite a non-empty OUT_DIR")
    p.add_argument("--pubkey", help="verify: the signer's public key PEM to require")
    p.add_argument(
        "--eval-data", action="append", default=[], metavar="PATH", help="eval: held-out text/shards"
    )
    p.add_argument("--max-seqs", type=int, default=8, help="eval: sequences per language")
    p.add_argument("--gen-tokens", type=int, default=16, help="eval: tokens generated for the speed figure")
    p.add_argument("--json", dest="json_out", help="eval: also write the report as JSON here")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(a: argparse.Namespace) -> int:
    head, rest = a.args[0], a.args[1:]
    if head == "verify":
        if len(rest) != 1:
            raise ValueError("usage: kmoe quantize verify OUT_DIR [--pubkey PEM]")
        return cmd_verify(Path(rest[0]), a.pubkey)
    if head == "eval":
        if len(rest) < 2:
            raise ValueError("usage: kmoe quantize eval SOURCE ARTIFACT... --eval-data PATH")
        return cmd_eval(a, Path(rest[0]), [Path(x) for x in rest[1:]])
    if len(a.args) != 2 or not a.method:
        raise ValueError("usage: kmoe quantize --method {gptq,gguf,nf4,int8} SOURCE OUT_DIR")
    from quantize.pipeline import QuantizeOptions, quantize

    opts = QuantizeOptions(
        method=a.method, bits=a.bits, group_size=a.group_size, gguf_type=a.gguf_type, calib=a.calib, mix=a.mix,
        num_samples=a.num_samples, seq_len=a.seq_len, calibrate_all_experts=a.calibrate_all_experts,
        min_expert_tokens=a.min_expert_tokens, quantize_lm_head=a.quantize_lm_head,
        quantize_embedding=a.quantize_embedding, tokenizer=a.tokenizer,
        key=a.key, force=a.force,
    )  # fmt: skip
    q = quantize(head, rest[0], opts)
    p = q["params"]
    emit(f"quantized {head} -> {rest[0]} ({a.method}); signed manifest written")
    if "routed_tokens_per_expert" in p:
        for layer, counts in p["routed_tokens_per_expert"].items():
            emit(f"  {layer}: routed calibration tokens per expert {counts}")
        emit(
            f"  every expert calibrated on {'all ' + str(p['calibration_tokens']) if p['calibrate_all_experts'] else 'its routed'} tokens"
        )
    return 0


def cmd_verify(out: Path, pubkey: str | None) -> int:
    from quantize.manifest import verify_artifact

    m = verify_artifact(out, pubkey)
    emit(
        f"verify {out}: ok, {len(m['files'])} files match the manifest signed by {m['signer']['public_key_sha256'][:16]}..."
    )
    return 0


def cmd_eval(a: argparse.Namespace, source: Path, artifacts: list[Path]) -> int:
    from quantize.evaluate import evaluate, table
    from quantize.hfdir import require_tokenizer, resolve_source

    if not a.eval_data:
        raise ValueError("kmoe quantize eval needs --eval-data PATH (held-out .jsonl/.txt or a shards dir)")
    for p in artifacts:
        if not p.exists():
            raise ValueError(f"ARTIFACT {p}: no such file or directory")
    with terminate_as_exit(), tempfile.TemporaryDirectory(prefix="kmoe-eval-") as work:
        hf = resolve_source(source, Path(work), a.tokenizer)
        require_tokenizer(hf)
        report = evaluate(
            hf, artifacts, a.eval_data, seq_len=a.seq_len, max_seqs=a.max_seqs, gen_tokens=a.gen_tokens
        )
    emit(table(report))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=1) + "\n")
    failed = [r["artifact"] for r in report["rows"] if r.get("error")]
    if failed:
        emit(f"kmoe quantize eval: {len(failed)} artifact(s) could not be evaluated: {', '.join(failed)}")
    return 1 if failed else 0


@contextlib.contextmanager
def terminate_as_exit():
    """SIGTERM (a job scheduler, `timeout`) unwinds like Ctrl-C, so temporary directories are removed."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
