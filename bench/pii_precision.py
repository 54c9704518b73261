"""Precision and recall of PII detection per kind, on labelled snippets and on real technical text.

    .venv/bin/python bench/pii_precision.py [--labels tests/fixtures/pii_labelled.txt]
                                            [--real .cache/data/demo/lo-help-ko.jsonl.gz ...] [--show 10]

Labelled: Korean, Japanese and English manual text with dotted section and version numbers, code, git/SSH
remotes and scp targets, plus personal data of every kind we detect (tests/fixtures/pii_labelled.txt, written
for kmoe). Scored twice in the same run: with the context rules (data_prep/pii_detect.py, what the pipeline
uses) and with format and checksum checks only (the detector before the context rules), the baseline.
Real: with `--real FILE...` (demo-source caches, `{"text"}` per line) counts the replacements each detector
makes in that text and prints examples of what only the format-only detector replaces (those are the false
positives the context rules remove, to be read by a person).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.pii_detect import KINDS, find_pii  # noqa: E402
from data_prep.pii_eval import evaluate, load_labelled  # noqa: E402


def labelled_table(path: Path) -> None:
    snippets = load_labelled(path)
    n_gold = Counter(k for sn in snippets for *_, k in sn.gold)
    print(f"labelled set {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
          f"{len(snippets)} snippets, {sum(n_gold.values())} labelled values")  # fmt: skip
    res = {name: evaluate(snippets, context=ctx) for name, ctx in (("format only", False), ("context", True))}
    print(
        f"{'kind':<6} {'labels':>6} | {'format-only P':>13} {'R':>6} {'FP':>4} | {'context P':>9} {'R':>6} {'FP':>4}"
    )
    for kind in KINDS:
        a, b = res["format only"]["kinds"][kind], res["context"]["kinds"][kind]
        print(f"{kind:<6} {n_gold[kind]:>6} | {a['precision']:>13.3f} {a['recall']:>6.3f} {a['fp']:>4} | "
              f"{b['precision']:>9.3f} {b['recall']:>6.3f} {b['fp']:>4}")  # fmt: skip
    for name, r in res.items():
        tp = sum(k["tp"] for k in r["kinds"].values())
        fp = sum(k["fp"] for k in r["kinds"].values())
        fn = sum(k["fn"] for k in r["kinds"].values())
        print(f"{name:<12} overall: precision {tp / max(tp + fp, 1):.3f}, recall {tp / max(tp + fn, 1):.3f} "
              f"({tp} right, {fp} wrongly replaced, {fn} missed)")  # fmt: skip
    for err in res["context"]["errors"]:
        print("  context detector error:", json.dumps(err, ensure_ascii=False))


def real_counts(files: list[Path], show: int) -> None:
    before, after, examples = Counter(), Counter(), []
    docs = 0
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                text = json.loads(line)["text"]
                docs += 1
                a = set(find_pii(text, KINDS, context=False))
                b = set(find_pii(text, KINDS, context=True))
                before.update(k for *_, k in a)
                after.update(k for *_, k in b)
                for s, e, k in sorted(a - b)[: max(0, show - len(examples))]:
                    examples.append((k, text[max(0, s - 30) : e + 20].replace("\n", "⏎")))
    print(f"\nreal text: {docs} documents from {', '.join(f.name for f in files)}")
    print(f"{'kind':<6} {'format-only':>11} {'context':>8}")
    for kind in KINDS:
        print(f"{kind:<6} {before[kind]:>11} {after[kind]:>8}")
    for kind, ctx in examples:
        print(f"  replaced only without context rules ({kind}): ...{ctx}...")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=Path, default=ROOT / "tests" / "fixtures" / "pii_labelled.txt")
    ap.add_argument("--real", type=Path, nargs="*", default=[], help="demo-source caches (*.jsonl.gz)")
    ap.add_argument("--show", type=int, default=10, help="examples of removed false positives to print")
    args = ap.parse_args()
    labelled_table(args.labels)
    if args.real:
        real_counts(args.real, args.show)


if __name__ == "__main__":
    main()
