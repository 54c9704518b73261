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
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="when not bit for bit: the largest weight distance to the recorded checkpoint, relative to the "
        "update since the start checkpoint (default 1e-3)",
    )
    p.add_argument(
        "--step-tolerance",
        type=float,
        default=1e-3,
        help="when not bit for bit: the largest relative deviation of a step's loss or grad norm (default 1e-3)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="replay at this many intra-op threads (default: the count the genesis records, for identical bits)",
    )
    p.add_argument(
        "--exact", action="store_true", help="fail unless every step and the weights are bit for bit"
    )
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

    r = replay(args.run_dir, args.from_step, args.steps, tolerance=args.tolerance, shards=args.shards,
               step_tolerance=args.step_tolerance, threads=args.threads, exact=args.exact)  # fmt: skip
    emit(
        f"replay {args.run_dir}: steps {r.from_step + 1}..{r.to_step} from its checkpoint, compared with {r.target}"
    )
    for s in r.environment_set:
        emit(f"  environment: set to the recorded {s}")
    for s in r.environment_differs:
        emit(f"  environment differs: {s}")
    for d in r.divergences:
        emit(f"  DIVERGES: {d}")
    emit(replay_verdict(r))
    return 0 if r.ok else 1


def replay_verdict(r) -> str:
    if r.bitwise and r.ok and not any(r.max_deviation.values()):
        return "replay: OK, bit for bit (the replayed weights have the recorded Merkle root)"
    if not r.ok:
        return f"replay: FAILED, first diverging step {r.first_divergence or r.to_step}"
    why = (
        "the environment differs as listed"
        if r.environment_differs
        else "the recorded environment was reproduced: something the genesis does not record differs "
        "(CPU model, library build)"
    )
    devs = ", ".join(f"{k} {v:.1e}" for k, v in r.max_deviation.items())
    weights = "bit for bit" if r.bitwise else f"{r.relative_distance:.1e} (<= {r.tolerance:g})"
    return (
        f"replay: OK within tolerance, not bit for bit ({why}): largest relative step deviation {devs} "
        f"(<= {r.step_tolerance:g}); weights' relative distance {weights}"
    )


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
