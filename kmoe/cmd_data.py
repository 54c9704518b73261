"""`kmoe data build|stats|fetch`: thin wrappers over data_prep."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kmoe.output import emit


def register(sub: argparse._SubParsersAction) -> None:
    p_data = sub.add_parser("data", help="build the corpus and token shards")
    dsub = p_data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = dsub.add_parser("build", help="sources -> cleaned corpus -> tokenizer -> Megatron shards + manifest")
    p.add_argument("--config", required=True, help="a configs/data/*.yaml")
    p.add_argument("--out", required=True, help="output directory (a relaunch into it skips finished tasks)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.set_defaults(func=cmd_build)

    p = dsub.add_parser("stats", help="print the accounting table and shard counts of a build")
    p.add_argument("out", help="a `kmoe data build` output directory")
    p.add_argument(
        "--verify", action="store_true", help="recompute every file's sha256 against manifest.json"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)


def cmd_build(args: argparse.Namespace) -> int:
    from data_prep.config import load_data_config
    from data_prep.pipeline import build

    cfg = load_data_config(args.config, args.set)
    result = build(cfg, args.out)
    if cfg.executor.kind == "slurm":
        jobs = ", ".join(f"{k} {v}" if v != -1 else f"{k} (done)" for k, v in result["slurm_jobs"].items())
        emit(f"submitted the data build to SLURM (jobs: {jobs}); logs under {args.out}/work/logs/")
        return 0
    emit(_report(Path(args.out)))
    return 0


def _report(out: Path) -> str:
    from data_prep.accounting import table

    stats = json.loads((out / "stats.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    lines = [
        f"data build {out}",
        table(stats),
        "",
        f"{'shard':<6} {'parts':>5} {'docs':>9} {'tokens':>12} {'weight':>7} {'natural':>8}",
    ]
    for lang, c in manifest["counts"].items():
        m = manifest["mix"][lang]
        lines.append(
            f"{lang:<6} {len(c.get('parts', [lang])):>5} {c['docs']:>9,} {c['tokens']:>12,} {m['weight']:>7.3f} "
            f"{m['natural_share']:>8.3f}"
        )
    t = manifest["tokenizer"]
    lines += [
        f"tokenizer {t['path']} (vocab {t['vocab_size']}, eos {t['eos_id']}, digest {t['digest'][:16]}...)",
        f"manifest root_hash {manifest['root_hash']}",
    ]
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    from data_prep.manifest import verify_manifest

    out = Path(args.out)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out}/manifest.json not found: not a finished `kmoe data build` output")
    if args.json:
        emit((out / "stats.json").read_text().rstrip())
    else:
        emit(_report(out))
    if args.verify:
        bad = verify_manifest(out, json.loads((out / "manifest.json").read_text()))
        if bad:
            raise ValueError(f"{len(bad)} file(s) differ from manifest.json: {', '.join(bad[:5])}")
        emit("verify: every file matches manifest.json")
    return 0
