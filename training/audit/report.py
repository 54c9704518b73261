"""`kmoe audit report RUN_DIR --out report.html`: one self-contained page for auditors.

The page holds the verification verdict, genesis facts, loss/lr/grad-norm curves, tokens per language, an
expert-load heatmap over training, the checkpoint table with digests and every event. Data goes in as one JSON
block; the inline script draws SVG and fills tables with textContent only (ledger strings are untrusted), and
nothing is fetched from the network.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from training.audit.verify import Verification, verify_run

MAX_COLUMNS = 240  # heatmap columns; longer runs are averaged into buckets


def _num(x: Any) -> float | None:
    return x if isinstance(x, int | float) else None  # "nan"/"inf" strings become gaps


def effective_steps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training trajectory as it stands: a step redone after a resume or rollback replaces the old one."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("kind") == "step" and isinstance(r.get("step"), int):
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def heatmap(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of routed tokens per expert (summed over MoE layers), columns = step buckets."""
    rows = [(s["step"], (s.get("expert_load") or {}).get("per_expert") or []) for s in steps]
    rows = [(st, v) for st, v in rows if v]
    if not rows:
        return {"experts": 0, "columns": [], "steps": []}
    width = max(1, -(-len(rows) // MAX_COLUMNS))
    cols, labels = [], []
    for i in range(0, len(rows), width):
        chunk = rows[i : i + width]
        summed = [sum(c) for c in zip(*(v for _, v in chunk))]
        total = sum(summed) or 1
        cols.append([round(x / total, 5) for x in summed])
        labels.append(chunk[-1][0])
    return {"experts": len(cols[0]), "columns": cols, "steps": labels}


def language_tokens(steps: list[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for s in steps:
        for lang, n in (s.get("lang_tokens") or {}).items():
            total[lang] = total.get(lang, 0) + int(n)
    return dict(sorted(total.items()))


def report_data(v: Verification) -> dict[str, Any]:
    records = [r for _, r in v.chain.records] if v.chain else []
    genesis = records[0] if records and records[0].get("kind") == "genesis" else {}
    steps = effective_steps(records)
    cfg = genesis.get("config") or {}
    return {
        "run_dir": str(v.run_dir),
        "verification": {"ok": v.ok, "findings": v.findings, "notes": v.notes, "summary": v.summary},
        "genesis": {
            "run": cfg.get("name"),
            "time": genesis.get("time"),
            "seed": genesis.get("seed"),
            "config_hash": genesis.get("config_hash"),
            "key_id": genesis.get("key_id"),
            "init_root": (genesis.get("init") or {}).get("merkle_root"),
            "init_tensors": len((genesis.get("init") or {}).get("tensors") or {}),
            "code": genesis.get("code"),
            "environment": genesis.get("environment"),
            "data": genesis.get("data"),
            "model": cfg.get("model"),
        },
        "curves": {
            "step": [s["step"] for s in steps],
            "loss": [_num(s.get("loss")) for s in steps],
            "lr": [_num(s.get("lr")) for s in steps],
            "grad_norm": [_num(s.get("grad_norm")) for s in steps],
            "tokens": [s.get("tokens") for s in steps],
        },
        "languages": language_tokens(steps),
        "heatmap": heatmap(steps),
        "checkpoints": [
            {k: r.get(k) for k in ("seq", "step", "tokens", "path", "roots", "files", "time")}
            for r in records
            if r.get("kind") == "checkpoint"
        ],
        "events": [
            {k: val for k, val in r.items() if k not in ("prev", "kind")}
            for r in records
            if r.get("kind") == "event"
        ],
        "superseded_steps": sum(r.get("kind") == "step" for r in records) - len(steps),
    }


def render(data: dict[str, Any]) -> str:
    template = resources.files("training.audit").joinpath("report_template.html").read_text()
    # "<" escaped so no ledger string can close the <script> block the data sits in
    blob = json.dumps(data, ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")
    return template.replace("/*__KMOE_DATA__*/null", blob)


def write_report(run_dir: str | Path, out: str | Path, pubkey: str | None = None) -> bool:
    """Verify the run and write the HTML page; returns the verification verdict."""
    v = verify_run(run_dir, pubkey=pubkey)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report_data(v)), encoding="utf-8")
    return v.ok
