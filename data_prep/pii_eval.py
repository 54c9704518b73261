"""Precision and recall of the PII detector on labelled snippets (tests/fixtures/pii_labelled.txt).

Format: a snippet starts with a line `=== <lang> <what>`; `⟦kind:value⟧` marks a value that must be replaced,
everything else must be left alone. A detected span counts as a true positive only if kind, start and end all
match a label.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from data_prep.pii_detect import KINDS, find_pii

_MARK = re.compile(r"⟦(\w+):(.*?)⟧")


@dataclass
class Snippet:
    label: str  # "<lang> <what>"
    text: str
    gold: list[tuple[int, int, str]]


def parse_snippet(label: str, marked: str) -> Snippet:
    """Strip the ⟦kind:value⟧ marks, remembering where each value lands in the plain text."""
    parts, gold, pos = [], [], 0
    for m in _MARK.finditer(marked):
        parts.append(marked[pos : m.start()])
        start = sum(map(len, parts))
        if m.group(1) not in KINDS:
            raise ValueError(f"snippet '{label}': unknown kind {m.group(1)!r}")
        parts.append(m.group(2))
        gold.append((start, start + len(m.group(2)), m.group(1)))
        pos = m.end()
    parts.append(marked[pos:])
    return Snippet(label, "".join(parts), gold)


def load_labelled(path: Path) -> list[Snippet]:
    snippets, label, lines = [], None, []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("=== "):
            if label is not None:
                snippets.append(parse_snippet(label, "\n".join(lines).strip("\n")))
            label, lines = line[4:].strip(), []
        elif label is not None:
            lines.append(line)
        elif line.strip() and not line.startswith("#"):
            raise ValueError(f"{path}: text before the first '=== ' snippet header: {line!r}")
    if label is not None:
        snippets.append(parse_snippet(label, "\n".join(lines).strip("\n")))
    return snippets


def evaluate(snippets: list[Snippet], context: bool = True) -> dict:
    """Per kind: tp, fp, fn, precision, recall; plus the wrong spans (fp) and the missed ones (fn)."""
    tp, fp, fn = Counter(), Counter(), Counter()
    errors = []
    for sn in snippets:
        found = set(find_pii(sn.text, KINDS, context=context))
        gold = set(sn.gold)
        for s, e, kind in sorted(found | gold):
            hit = (s, e, kind) in found and (s, e, kind) in gold
            if hit:
                tp[kind] += 1
                continue
            which = "fp" if (s, e, kind) in found else "fn"
            (fp if which == "fp" else fn)[kind] += 1
            errors.append({"snippet": sn.label, which: kind, "text": sn.text[s:e]})
    kinds = {}
    for kind in KINDS:
        t, p, n = tp[kind], fp[kind], fn[kind]
        kinds[kind] = {
            "tp": t,
            "fp": p,
            "fn": n,
            "precision": t / (t + p) if t + p else 1.0,
            "recall": t / (t + n) if t + n else 1.0,
        }
    return {"kinds": kinds, "errors": errors}
