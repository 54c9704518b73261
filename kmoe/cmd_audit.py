"""`kmoe audit verify|init-check|compare|report`: the auditor's tools over a run directory or two models."""

from __future__ import annotations

import argparse
import json

from kmoe.output import emit


def register(sub: argparse._SubParsersAction) -> None:
    p_audit = sub.add_parser("audit", help="check a run's ledger, its initial weights, lineage; HTML report")
    asub = p_audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    p = asub.add_parser(
        "verify", help="chain, signatures, checkpoints on disk, continuity (exit 1 on a finding)"
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--pubkey",
        help="pin the run's key: hex public key, its key id, or a .pub file "
        "(default: <runs>/.keys/<run>.ed25519.pub when present)",
    )
    p.add_argument("--no-files", action="store_true", help="skip re-hashing checkpoint files")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = asub.add_parser(
        "init-check", help="rebuild the initial weights from config + seed, compare with genesis"
    )
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_init_check)

    p = asub.add_parser(
        "replay", help="re-execute recorded steps from a checkpoint, compare with the next one"
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--from-step",
        type=int,
        required=True,
        help="a step with a recorded checkpoint; negative counts back over the checkpoints on disk "
        "(-2: the second-to-last)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help="steps to replay; a checkpoint must exist at the end (default: up to the next checkpoint on disk)",
    )
    p.add_argument("--tolerance", type=float, default=1e-3, help="relative weight distance when not bitwise")
    p.add_argument("--shards", help="the run's data directory when it is not where the run config says")
    p.set_defaults(func=cmd_replay)

    p = asub.add_parser("compare", help="weight-lineage statistics between two models (kmoe or HF dirs)")
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument(
        "--alpha", type=float, default=1e-3, help="significance level for 'derived' (default 1e-3)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = asub.add_parser("report", help="one self-contained HTML page for auditors")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output .html file")
    p.add_argument("--pubkey", help="as for verify")
    p.set_defaults(func=cmd_report)


def cmd_verify(args: argparse.Namespace) -> int:
    from training.audit.verify import verify_run

    v = verify_run(args.run_dir, pubkey=args.pubkey, check_files=not args.no_files)
    if args.json:
        emit(
            json.dumps({"ok": v.ok, "findings": v.findings, "notes": v.notes, "summary": v.summary}, indent=1)
        )
        return 0 if v.ok else 1
    s = v.summary
    emit(
        f"ledger {args.run_dir}: {s.get('records', 0)} records, {s.get('steps', 0)} steps, "
        f"{s.get('checkpoints', 0)} checkpoints, {s.get('signatures', 0)} signatures; "
        f"key id {str(s.get('key_id'))[:16]}..., head {str(s.get('head'))[:16]}..."
    )
    for n in v.notes:
        emit(f"  note: {n}")
    for f in v.findings:
        emit(f"  FINDING: {f}")
    emit("verify: OK" if v.ok else f"verify: FAILED ({len(v.findings)} finding(s))")
    return 0 if v.ok else 1


def cmd_init_check(args: argparse.Namespace) -> int:
    from training.audit.init_check import init_check

    r = init_check(args.run_dir)
    if args.json:
        emit(json.dumps(r.__dict__ | {"ok": r.ok}, indent=1))
        return 0 if r.ok else 1
    emit(
        f"init-check {args.run_dir}: seed {r.seed}, {r.tensors} tensors; recorded init root "
        f"{r.recorded_root}; rebuilt root {r.rebuilt_root}"
    )
    for f in r.findings:
        emit(f"  FINDING: {f}")
    emit(
        "init-check: OK (the run began from the recorded seed's initialisation)"
        if r.ok
        else "init-check: FAILED"
    )
    return 0 if r.ok else 1


def cmd_replay(args: argparse.Namespace) -> int:
    from training.audit.replay import replay

    r = replay(args.run_dir, args.from_step, args.steps, tolerance=args.tolerance, shards=args.shards)
    emit(
        f"replay {args.run_dir}: steps {r.from_step + 1}..{r.to_step} from its checkpoint, compared with {r.target}"
    )
    for d in r.divergences:
        emit(f"  DIVERGES: {d}")
    if r.bitwise:
        emit("replay: OK, bit for bit (the replayed weights have the recorded Merkle root)")
    elif r.ok:
        emit(f"replay: OK within tolerance (relative distance {r.relative_distance:.3e} <= {r.tolerance:g})")
    else:
        emit(f"replay: FAILED, first diverging step {r.first_divergence or r.to_step}")
    return 0 if r.ok else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from training.audit.lineage import compare_models, format_comparison

    res = compare_models(args.model_a, args.model_b, alpha=args.alpha)
    emit(json.dumps(res, indent=1) if args.json else format_comparison(res))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from training.audit.report import write_report

    ok = write_report(args.run_dir, args.out, pubkey=args.pubkey)
    emit(f"report: {args.out} (verification {'OK' if ok else 'FAILED'})")
    return 0
