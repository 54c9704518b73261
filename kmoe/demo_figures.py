"""The key figure of each `make demo` stage, read from what the stage wrote (used by `kmoe demo note`).

One function per stage, DIR -> short text; to give a stage a figure (or another one), add or extend its
function here. A figure that cannot be read says why instead of failing the demo.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def model(d: Path) -> str:
    from model.checkpoint import read_config
    from model.params import human, model_size

    cfg, _ = read_config(d / "tiny-init")
    size = model_size(cfg)
    return f"tiny MoE {human(size.total)} params ({human(size.active)} active); HF export logits checked"


def data(d: Path) -> str:
    stats = json.loads((d / "data/stats.json").read_text())["overall"]
    counts = json.loads((d / "data/manifest.json").read_text())["counts"]
    tokens = ", ".join(f"{lang} {c['tokens'] / 1e6:.2f}M" for lang, c in sorted(counts.items()))
    return f"{stats['kept']:,} of {stats['in']:,} docs kept; tokens {tokens}"


def tokenizer(d: Path) -> str:
    parts = []
    for name in ("tokenizer", "tokenizer-64k"):
        rep = json.loads((d / name / "report.json").read_text())
        ood = rep["groups"]["ko-ood"]["tokens_per_char_vs_default"]
        parts.append(f"vocab {rep['vocab_size']}: {-ood:.1%} fewer tokens/char on unseen Korean")
    return "; ".join(parts) + " (vs sentencepiece defaults)"


def train(d: Path) -> str:
    rows = [
        r for r in _jsonl(d / "runs/tiny/metrics.jsonl") if "loss" in r and "step" in r and "event" not in r
    ]
    first, last = rows[0], rows[-1]
    balance = [r for r in rows if "expert_max_cv" in r]
    dead = sum(r["expert_dead_frac"] > 0 for r in balance if r["step"] > 10)
    cv = (
        f"; final load CV {balance[-1]['expert_max_cv']:.3f}, {dead} windows with an idle expert"
        if balance
        else ""
    )
    return f"{last['step']} steps, train loss {first['loss']:.2f} -> {last['loss']:.2f}{cv}"


def audit(d: Path) -> str:
    records = _jsonl(d / "runs/tiny/ledger.jsonl")
    steps = sum(r.get("kind") == "step" for r in records)
    return f"ledger of {len(records)} records ({steps} steps) verified; last interval replayed bit for bit"


def quantize(d: Path) -> str:
    rows = json.loads((d / "quant/eval.json").read_text())["rows"][1:]
    parts = []
    for r in rows:
        ko = f", ko ppl {r['ppl_change_pct']['ko']:+.1f}%" if r.get("ppl_change_pct") else ", ppl n/a"
        parts.append(f"{r['artifact']} {r['x_bf16']:.2f}x{ko}")
    return "; ".join(parts)


def launch(d: Path) -> str:
    ledger = d / "runs/toy-slurm/ledger.jsonl"
    if not ledger.is_file():
        return "sbatch script rendered and checked (no local SLURM here)"
    resumes = sum(r.get("kind") == "event" and r.get("event") == "resume" for r in _jsonl(ledger))
    return f"toy job preempted, requeued and resumed {resumes} time(s); ledger verified"


def _engine_run(d: Path, run: str, what: str) -> str:
    rows = [
        r
        for r in _jsonl(d / "runs" / run / "metrics.jsonl")
        if "loss" in r and "step" in r and "event" not in r
    ]
    return f"{what}: {rows[-1]['step']} steps, train loss {rows[0]['loss']:.2f} -> {rows[-1]['loss']:.2f}; ledger verified"


def megatron(d: Path) -> str:
    return _engine_run(d, "tiny-megatron", "megatron-core GPTModel") + "; replayed bit for bit"


def deepspeed(d: Path) -> str:
    return _engine_run(d, "tiny-zero3", "ZeRO-3 on 2 ranks")


FIGURES: dict[str, Callable[[Path], str]] = {
    "demo-model": model, "demo-data": data, "demo-tokenizer": tokenizer, "demo-train": train,
    "demo-audit": audit, "demo-quantize": quantize, "demo-launch": launch, "demo-megatron": megatron,
    "demo-deepspeed": deepspeed,
}  # fmt: skip


def stage_figure(stage: str, d: Path) -> str:
    fn = FIGURES.get(stage)
    if fn is None:
        return ""
    try:
        return fn(d)
    except (OSError, KeyError, ValueError, IndexError, ZeroDivisionError) as e:
        return f"(figure unavailable: {type(e).__name__}: {e})"
