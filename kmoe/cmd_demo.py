"""`kmoe demo begin|note|summary`: the `make demo` story, one stage at a time, and its closing table.

Each Makefile stage starts with `kmoe demo begin STAGE "what it does"` (a header in the log, the start time in
DIR/.stage-STAGE) and ends with `kmoe demo note STAGE` (one line appended to DIR/summary.tsv: stage, seconds,
key figure). The figure comes from the stage's outputs (kmoe/demo_figures.py, one function per stage) and/or
`--figure TEXT`. `kmoe demo summary` prints the table; `make demo` empties it first (`--reset`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kmoe.output import emit

SUMMARY = "summary.tsv"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="`make demo` bookkeeping: stage headers, timings, the summary table")
    dsub = p.add_subparsers(dest="demo_command", metavar="ACTION", required=True)
    b = dsub.add_parser("begin", help="print a stage header and record its start time")
    b.add_argument("stage")
    b.add_argument("title", nargs="?", default="")
    b.set_defaults(func=cmd_begin)
    n = dsub.add_parser("note", help="append the stage's time and key figure to the summary")
    n.add_argument("stage")
    n.add_argument("--figure", default="", help="figure text (added after the stage's computed figure)")
    n.set_defaults(func=cmd_note)
    s = dsub.add_parser("summary", help="print the summary table")
    s.add_argument("--reset", action="store_true", help="empty the summary instead")
    s.set_defaults(func=cmd_summary)
    for q in (b, n, s):
        q.add_argument("--dir", default=".cache/demo", help="the demo output directory")


def cmd_begin(a: argparse.Namespace) -> int:
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / f".stage-{a.stage}").write_text(f"{time.time():.3f}\n")
    emit(f"\n=== {a.stage}" + (f": {a.title}" if a.title else "") + " ===")
    return 0


def cmd_note(a: argparse.Namespace) -> int:
    from kmoe.demo_figures import stage_figure

    d = Path(a.dir)
    start = d / f".stage-{a.stage}"
    seconds = time.time() - float(start.read_text()) if start.is_file() else None
    figure = "; ".join(x for x in (stage_figure(a.stage, d), a.figure) if x)
    line = "\t".join([a.stage, "" if seconds is None else f"{seconds:.0f}", figure.replace("\t", " ")])
    with (d / SUMMARY).open("a", encoding="utf-8") as f:
        f.write(line + "\n")
    emit(f"--- {a.stage} done" + (f" in {seconds:.0f} s" if seconds is not None else "") + f": {figure}")
    return 0


def summary_table(rows: list[list[str]]) -> str:
    """Rows of (stage, seconds or "", figure) as an aligned table with a total time."""
    total = sum(int(r[1]) for r in rows if r[1])
    cells = [["stage", "time", "key figure"], *([r[0], _mmss(int(r[1])) if r[1] else "", r[2]] for r in rows)]
    cells.append(["total", _mmss(total), ""])
    w0, w1 = (max(len(c[i]) for c in cells) for i in (0, 1))
    return "\n".join(f"{c[0]:<{w0}}  {c[1]:>{w1}}  {c[2]}".rstrip() for c in cells)


def _mmss(seconds: int) -> str:
    return f"{seconds // 60}:{seconds % 60:02d}"


def cmd_summary(a: argparse.Namespace) -> int:
    path = Path(a.dir) / SUMMARY
    if a.reset:
        path.unlink(missing_ok=True)
        return 0
    if not path.is_file():
        raise ValueError(f"{path}: no stage has finished yet (stages append to it with `kmoe demo note`)")
    rows = [(ln.split("\t") + ["", ""])[:3] for ln in path.read_text(encoding="utf-8").splitlines() if ln]
    emit(f"\n=== demo summary ({path}) ===\n" + summary_table(rows))
    return 0
