"""`kmoe quantize eval`: size, held-out perplexity per language and CPU generation speed, per artifact.

Perplexity is computed on the same token sequences for the source and every artifact (teacher-forced, mean
token NLL, exp). GGUF files run in llama.cpp through `llama-cpp-python`, in a child process each
(quantize/llamacpp.py): when it is not installed their rows carry sizes only and say why; when llama.cpp
crashes the row carries the error and the other rows are still measured.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from . import calibration as C
from .hfdir import bytes_on_disk, read_config
from .samples import KOREAN_PROMPT

log = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def n_params(hf_dir: Path) -> int:
    from .hfdir import read_state

    return sum(t.numel() for t in read_state(hf_dir).values())


class HFRunner:
    """Teacher-forced NLL and greedy generation for a transformers model."""

    def __init__(self, model):
        self.model = model.eval()

    @torch.no_grad()
    def nll(self, seq: list[int]) -> tuple[float, int]:
        x = torch.tensor([seq])
        logits = self.model(x).logits.float()[0, :-1]
        return torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item(), len(seq) - 1

    @torch.no_grad()
    def generate(self, ids: list[int], n: int) -> list[int]:
        """Plain greedy decoding with the KV cache, no EOS handling: the same rule llama.cpp's runner uses."""
        out = self.model(torch.tensor([ids]), use_cache=True)
        toks = [int(out.logits[0, -1].argmax())]
        while len(toks) < n:
            out = self.model(torch.tensor([toks[-1:]]), past_key_values=out.past_key_values, use_cache=True)
            toks.append(int(out.logits[0, -1].argmax()))
        return toks


def artifact_kind(path: Path) -> tuple[str, str, Path]:
    """(method, table label, file or dir to open) for an artifact dir or a .gguf file."""
    qj = path / "quantization.json"
    q = json.loads(qj.read_text()) if qj.is_file() else {}
    method = q.get("method") or ("gguf" if path.suffix == ".gguf" else "hf")
    if method == "gguf":
        f = path if path.suffix == ".gguf" else next(path.glob("*.gguf"))
        return method, f"gguf {f.stem.removeprefix('model-')}", f
    if method == "gptq":
        p = q["params"]
        return (
            method,
            f"gptq {p['scheme']} g{p['group_size']}"
            + ("" if "lm_head" in p["ignored"] else " +head")
            + ("" if p.get("embedding", "bf16") == "bf16" else " +emb8"),
            path,
        )
    return method, method, path


def open_artifact(method: str, path: Path):
    """A runner for a transformers-loadable artifact (GPTQ, bitsandbytes, an HF dir)."""
    from transformers import AutoModelForCausalLM

    if method in ("nf4", "int8"):
        from .bnb import load_bnb

        return HFRunner(load_bnb(path))
    return HFRunner(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32))


def perplexity(runner, seqs: dict[str, list[list[int]]]) -> dict[str, float]:
    out = {}
    for lang, ss in seqs.items():
        tot, n = 0.0, 0
        for s in ss:
            a, b = runner.nll(s)
            tot, n = tot + a, n + b
        out[lang] = math.exp(tot / max(n, 1))
    return out


def tokens_per_s(runner, prompt: list[int], n: int) -> tuple[float, list[int]]:
    runner.generate(prompt, 2)  # warm-up (allocations, llama.cpp graph)
    t = time.perf_counter()
    toks = runner.generate(prompt, n)
    return len(toks) / (time.perf_counter() - t), toks


def weight_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def evaluate(source_hf: Path, artifacts: list[Path], eval_paths: list[str], seq_len: int = 128,
             max_seqs: int = 8, gen_tokens: int = 16) -> dict:  # fmt: skip
    """Rows for the source and each artifact: bytes, bytes/param, x bf16, ppl per language and its change."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = read_config(source_hf)
    tok = AutoTokenizer.from_pretrained(str(source_hf))
    docs = C.read_docs(eval_paths)
    seqs = C.token_sequences(docs, tok, seq_len, max_seqs * len(docs.langs()))
    prompt = tok(KOREAN_PROMPT)["input_ids"]
    params = n_params(source_hf)
    bf16 = 2 * params
    src_runner = HFRunner(AutoModelForCausalLM.from_pretrained(str(source_hf), dtype=torch.float32))
    base_ppl = perplexity(src_runner, seqs)
    speed, base_toks = tokens_per_s(src_runner, prompt, gen_tokens)
    rows = [
        _row(
            "source (fp32 compute)", source_hf, params, bf16, base_ppl, base_ppl, speed, base_toks, base_toks
        )
    ]
    del src_runner
    for a in artifacts:
        rows.append(_artifact_row(a, seqs, prompt, gen_tokens, seq_len, (params, bf16, base_ppl, base_toks)))
    return {
        "params": params,
        "bf16_bytes": bf16,
        "vocab_size": cfg["vocab_size"],
        "eval": C.docs_record(docs, seqs, None),
        "rows": rows,
    }


def _artifact_row(a: Path, seqs, prompt, gen_tokens: int, seq_len: int, base: tuple) -> dict:
    """One artifact's row; a GGUF file runs in a llama.cpp child process, whose crash becomes the row's error."""
    from .llamacpp import BackendCrash, evaluate_gguf

    params, bf16, base_ppl, base_toks = base
    method, label, target = artifact_kind(a)
    if method != "gguf":
        runner = open_artifact(method, target)
        ppl = perplexity(runner, seqs)
        speed, toks = tokens_per_s(runner, prompt, gen_tokens)
        return _row(label, a, params, bf16, ppl, base_ppl, speed, toks, base_toks)
    try:
        got = evaluate_gguf(target, seqs, prompt, gen_tokens, n_ctx=seq_len + gen_tokens + 8)
    except ImportError as e:
        note = f"sizes only, llama-cpp-python is not installed (`make llama-cpp`): {e}"
        log.warning("%s: %s", label, note)
        return {**_row(label, a, params, bf16, None, base_ppl, None, None, base_toks), "note": note}
    except BackendCrash as e:
        log.error("%s: %s", label, e)
        return {**_row(label, a, params, bf16, None, base_ppl, None, None, base_toks), "error": str(e)}
    row = _row(label, a, params, bf16, got["ppl"], base_ppl, got["tokens_per_s"], got["tokens"], base_toks)
    return {**row, "note": got["note"]} if "note" in got else row


def _row(label, path, params, bf16, ppl, base, speed, toks, base_toks) -> dict:
    wb = weight_bytes(Path(path))
    match = None
    if toks is not None:
        match = next((i for i, (a, b) in enumerate(zip(toks, base_toks)) if a != b), len(toks))
    return {
        "artifact": label,
        "path": str(path),
        "bytes_on_disk": bytes_on_disk(path),
        "weight_bytes": wb,
        "bytes_per_param": wb / params,
        "x_bf16": wb / bf16,
        "ppl": ppl,
        "ppl_change_pct": {k: 100 * (ppl[k] / base[k] - 1) for k in ppl} if ppl else None,
        "tokens_per_s": speed,
        "greedy_prefix_match": match,
    }


def table(report: dict) -> str:
    langs = sorted(report["rows"][0]["ppl"])
    w = max(24, *(len(r["artifact"]) + 1 for r in report["rows"]))
    head = f"{'artifact':<{w}}{'bytes':>11}{'B/param':>9}{'x bf16':>8}" + "".join(
        f"{'ppl ' + lg:>17}" for lg in langs
    )
    lines = [head + f"{'tok/s':>8}{'greedy=':>8}"]
    for r in report["rows"]:
        cells = []
        for lg in langs:
            if r["ppl"] is None:
                cells.append(f"{'n/a':>17}")
            else:
                cells.append(f"{r['ppl'][lg]:>9.2f} ({r['ppl_change_pct'][lg]:+5.1f}%)")
        speed = f"{r['tokens_per_s']:>8.1f}" if r["tokens_per_s"] else f"{'n/a':>8}"
        match = f"{r['greedy_prefix_match']:>8}" if r["greedy_prefix_match"] is not None else f"{'n/a':>8}"
        lines.append(f"{r['artifact']:<{w}}{r['bytes_on_disk']:>11,}{r['bytes_per_param']:>9.3f}{r['x_bf16']:>8.3f}"
                     + "".join(cells) + speed + match)  # fmt: skip
    for r in report["rows"]:
        if r.get("error") or r.get("note"):
            lines.append(f"  {r['artifact']}: {'error: ' + r['error'] if r.get('error') else r['note']}")
    return "\n".join(lines)
