"""`kmoe launch slurm|status|local`: SLURM training jobs of a run config, their status, a local test cluster."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from kmoe.output import emit


def register(sub: argparse._SubParsersAction) -> None:
    p_launch = sub.add_parser(
        "launch", help="submit training to SLURM (auto-requeue on preemption), job status"
    )
    lsub = p_launch.add_subparsers(dest="launch_command", metavar="ACTION", required=True)

    p = lsub.add_parser("slurm", help="check a run config, render its sbatch script, submit it")
    p.add_argument(
        "--config", required=True, help="a configs/train/*.yaml run config (its `launch:` section)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--run-dir", help="run directory (default: runs/<name>); script, config and logs go there")
    p.add_argument(
        "--dry-run", action="store_true", help="print the script and the layout; write, submit nothing"
    )
    p.set_defaults(func=cmd_slurm)

    p = lsub.add_parser("status", help="a run's jobs (state, restarts), requeue marker, training progress")
    p.add_argument("run_dir")
    p.add_argument(
        "--wait", action="store_true", help="first wait for its last job to end (requeues included)"
    )
    p.set_defaults(func=cmd_status)

    p = lsub.add_parser(
        "local", help="a private SLURM on this machine, 1+ emulated nodes (root; apt-get install slurm-wlm)"
    )
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument(
        "--nodes", type=int, default=1, help="start: emulated nodes n1..nN (one slurmd each; default 1)"
    )
    p.add_argument(
        "--root", default=".cache/slurm", help="state, logs and slurm.conf (default: .cache/slurm)"
    )
    p.set_defaults(func=cmd_local)


def cmd_slurm(args: argparse.Namespace) -> int:
    from launch import slurm

    plan = slurm.plan(args.config, args.set, args.run_dir)
    slurm.preflight(plan, submitting=not args.dry_run)
    if args.dry_run:
        emit(slurm.render(plan).rstrip("\n"))
        emit("# layout: " + json.dumps(plan.layout()))
        emit(
            f"# would write {plan.script_path} and {plan.config_path}, then: sbatch --parsable {plan.script_path}"
        )
        return 0
    script = slurm.write(plan)
    job_id = slurm.submit(script, plan.run_dir)
    emit(job_id)
    emit(f"launch: job {job_id} submitted: {script}; logs {plan.run_dir}/slurm-{job_id}.out|.err; "
         f"`kmoe launch status {plan.run_dir}`")  # fmt: skip
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from launch import slurm

    run_dir = Path(args.run_dir)
    jobs = slurm.read_history(run_dir)
    if not jobs:
        raise ValueError(f"{run_dir}: no {slurm.HISTORY} (nothing was launched into this run directory)")
    known = shutil.which("scontrol") is not None
    final = slurm.wait_job(jobs[-1]["job_id"]) if args.wait else None
    for job in jobs:
        info = slurm.job_info(job["job_id"]) if known else None
        state = (f"{info.get('JobState')} restarts={info.get('Restarts')} exit={info.get('ExitCode')} "
                 f"run_time={info.get('RunTime')}" if info else "(no longer known to SLURM)")  # fmt: skip
        emit(f"job {job['job_id']} submitted {job['submitted']}: {state}")
    marker = run_dir / "requeue.json"
    if marker.is_file():
        emit(f"requeue.json: {marker.read_text().strip()} (checkpointed on request; waiting for its restart)")
    emit(_progress(run_dir))
    return 0 if final is None or final.get("JobState") == "COMPLETED" else 1


def _progress(run_dir: Path) -> str:
    """Last step, stop signals, resumes and the last `end` of the run's ledger (a torn last line, from a job
    killed mid-write, is passed over: `kmoe audit verify` judges it)."""
    from training.ledger_chain import read_lines

    path = run_dir / "ledger.jsonl"
    if not path.is_file():
        return "training: not started (no ledger.jsonl yet)"
    step, counts, end = 0, {"signal": 0, "resume": 0}, None
    for rec in (line.record for line in read_lines(path) if line.record is not None):
        kind, event = rec.get("kind"), rec.get("event")
        if kind == "event" and event == "end":
            end = rec.get("status")
        elif kind != "signature":  # anything after an end: a later start of the run
            end = None
        step = rec["step"] if kind == "step" else step
        if kind == "event" and event in counts:
            counts[event] += 1
    state = f"ended: {end}" if end else "running, or stopped without an end record"
    return f"training: step {step}, {state}; stop signals {counts['signal']}, resumes {counts['resume']}"


def cmd_local(args: argparse.Namespace) -> int:
    from launch.localslurm import LocalSlurm

    cluster = LocalSlurm(args.root, nodes=args.nodes)
    if args.action == "start":
        cluster.start()
        emit(f"local SLURM running ({', '.join(cluster.nodes)}); point the SLURM commands at it:\n"
             f"export SLURM_CONF={cluster.conf}")  # fmt: skip
    else:
        cluster.stop()
        emit(f"local SLURM under {cluster.root} stopped")
    return 0
