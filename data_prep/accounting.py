"""Merge per-task step counters into stats.json, check that every document is accounted for, print a table.

Identities checked (a failure is a bug, never a user error):
  per step:   in = kept + sum(removed) + sum(errors)
  chained:    in(step k+1) = kept(step k)
  overall:    records read = kept in shards + removed(all steps, by reason) + errors(all steps, by reason)
and the same three per source, over the steps that count per source (`by_source`; every step run by
DocStep does): stats.json `by_source` gives each source's in, kept, and removed/errors per step.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

STEP_ORDER = ("read", "decode", "normalize", "langid", "quality", "pii", "dedup", "mix")


class AccountingError(RuntimeError):
    """Counts do not add up: a document was lost or double-counted."""


def _merge(files: list[Path]) -> dict:
    total = {"in": 0, "kept": 0, "removed": Counter(), "errors": Counter(), "notes": Counter()}
    by_source: dict[str, Counter] = {}
    for f in files:
        d = json.loads(f.read_text())
        total["in"] += d["in"]
        total["kept"] += d["kept"]
        for k in ("removed", "errors", "notes"):
            total[k].update(d[k])
        for src, c in d.get("by_source", {}).items():
            by_source.setdefault(src, Counter()).update(c)
    out = {k: dict(sorted(v.items())) if isinstance(v, Counter) else v for k, v in total.items()}
    if by_source:
        out["by_source"] = {s: dict(sorted(c.items())) for s, c in sorted(by_source.items())}
    return out


def _source_steps(steps: dict) -> list[str]:
    """The leading run of steps that count per source (a step that does not ends the per-source chain)."""
    names = []
    for name in [s for s in STEP_ORDER if s in steps]:
        if "by_source" not in steps[name] and steps[name]["in"]:
            break
        names.append(name)
    return names


def by_source(steps: dict) -> dict:
    """Per source: in (read), kept after the last step that counts per source, removed/errors per step."""
    names = _source_steps(steps)
    out: dict[str, dict] = {}
    for i, name in enumerate(names):
        for src, c in steps[name].get("by_source", {}).items():
            o = out.setdefault(src, {"in": 0, "kept": 0, "removed": {}, "errors": {}})
            if i == 0:
                o["in"] = c.get("in", 0)
            if i == len(names) - 1:
                o["kept"] = c.get("kept", 0)
            for k in ("removed", "errors"):
                if c.get(k):
                    o[k][name] = c[k]
    return {"through": names[-1] if names else "", "sources": out}


def merge_stats(out_dir: str | Path) -> dict:
    """stats.json content from OUT/work/stats/<step>/*.json."""
    root = Path(out_dir) / "work" / "stats"
    steps = {}
    for name in STEP_ORDER:
        files = sorted((root / name).glob("*.json"))
        if files:
            steps[name] = _merge(files)
    overall = {
        "in": steps["read"]["in"] if "read" in steps else 0,
        "kept": steps[STEP_ORDER[-1]]["kept"] if STEP_ORDER[-1] in steps else 0,
        "removed": dict(
            sorted(
                Counter({f"{s}:{r}": n for s, d in steps.items() for r, n in d["removed"].items()}).items()
            )
        ),
        "errors": dict(
            sorted(Counter({f"{s}:{r}": n for s, d in steps.items() for r, n in d["errors"].items()}).items())
        ),
    }
    # Replacements in kept text (the pii step) and in removed records (every other step), per kind.
    pii: Counter[str] = Counter()
    for d in steps.values():
        pii.update({k.split(":", 1)[1]: v for k, v in d["notes"].items() if k.startswith("pii:")})
    return {
        "steps": steps,
        "overall": overall,
        "pii": dict(sorted(pii.items())),
        "by_source": by_source(steps),
    }


def check(stats: dict) -> None:
    """Raise AccountingError unless every identity holds."""
    prev = None
    for name in [s for s in STEP_ORDER if s in stats["steps"]]:
        d = stats["steps"][name]
        total = d["kept"] + sum(d["removed"].values()) + sum(d["errors"].values())
        if total != d["in"]:
            raise AccountingError(f"step {name}: in {d['in']} != kept+removed+errors {total}")
        if prev is not None and d["in"] != prev[1]:
            raise AccountingError(f"step {name}: in {d['in']} != kept {prev[1]} of step {prev[0]}")
        prev = (name, d["kept"])
    o = stats["overall"]
    total = o["kept"] + sum(o["removed"].values()) + sum(o["errors"].values())
    if total != o["in"]:
        raise AccountingError(f"overall: in {o['in']} != kept+removed+errors {total}")
    _check_sources(stats["steps"])


def _check_sources(steps: dict) -> None:
    prev: dict[str, int] | None = None
    for name in _source_steps(steps):
        per = steps[name].get("by_source", {})
        for src, c in per.items():
            if c.get("in", 0) != c.get("kept", 0) + c.get("removed", 0) + c.get("errors", 0):
                raise AccountingError(f"step {name}, source {src}: in != kept+removed+errors ({c})")
        if prev is not None:
            now = {s: c.get("in", 0) for s, c in per.items() if c.get("in", 0)}
            if now != {s: n for s, n in prev.items() if n}:
                raise AccountingError(
                    f"step {name}: in per source {now} != kept per source of the step before"
                )
        prev = {s: c.get("kept", 0) for s, c in per.items()}


def table(stats: dict) -> str:
    """A readable accounting table: one row per step, then removal/error reasons, PII and notes."""
    rows = [f"{'step':<10} {'in':>9} {'kept':>9} {'removed':>9} {'errors':>8}"]
    for name in [s for s in STEP_ORDER if s in stats["steps"]]:
        d = stats["steps"][name]
        rows.append(
            f"{name:<10} {d['in']:>9,} {d['kept']:>9,} {sum(d['removed'].values()):>9,} {sum(d['errors'].values()):>8,}"
        )
    o = stats["overall"]
    rows.append(
        f"{'overall':<10} {o['in']:>9,} {o['kept']:>9,} {sum(o['removed'].values()):>9,} {sum(o['errors'].values()):>8,}"
    )
    rows.append(f"  identity: {o['in']:,} in = {o['kept']:,} kept + {sum(o['removed'].values()):,} removed + "
                f"{sum(o['errors'].values()):,} errors")  # fmt: skip
    for label, key in (("removed", "removed"), ("errors", "errors")):
        if o[key]:
            rows.append(f"  {label} by reason: " + ", ".join(f"{k} {v:,}" for k, v in o[key].items()))
    if stats.get("pii"):
        where = {
            s: sum(v for k, v in d["notes"].items() if k.startswith("pii:"))
            for s, d in stats["steps"].items()
        }
        rows.append(
            "  PII replaced: "
            + ", ".join(f"{k} {v:,}" for k, v in stats["pii"].items())
            + " (by step: "
            + ", ".join(f"{s} {n:,}" for s, n in where.items() if n)
            + ")"
        )
    per = stats.get("by_source", {})
    if per.get("sources"):
        rows.append(f"  by source (in -> kept after {per['through']}):")
        rows += [f"    {src:<16} {d['in']:>9,} -> {d['kept']:>9,}" for src, d in per["sources"].items()]
    notes = {
        f"{s}:{k}": v
        for s, d in stats["steps"].items()
        for k, v in d["notes"].items()
        if not k.startswith("pii:")
    }
    if notes:
        rows.append("  notes: " + ", ".join(f"{k} {v:,}" for k, v in notes.items()))
    return "\n".join(rows)
