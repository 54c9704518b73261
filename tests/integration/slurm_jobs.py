"""Helpers of the SLURM launch tests: submit the toy config through `kmoe launch slurm` and read the run."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

from launch.localslurm import LocalSlurm

REPO = Path(__file__).resolve().parents[2]
TOY_CONFIG = str(REPO / "configs/train/toy.yaml")
STEPS = 150  # ~3 s of training: time enough to signal the job mid-run
# Job ids restart at 1 on every private cluster: a random base keeps concurrent test sessions' rendezvous apart.
RDZV_BASE = random.randint(20000, 40000)


def kmoe_launch(cluster: LocalSlurm, shards: Path, run_dir: Path, *more: str) -> subprocess.CompletedProcess:
    """`kmoe launch slurm` of the toy config as 2 CPU ranks (`more`: further `--set` overrides)."""
    sets = [f"data.shards={shards}", f"train.steps={STEPS}", "checkpoint.every=50", "train.eval_every=50",
            "log.wandb=false", "launch.gpus_per_node=0", "launch.procs_per_node=2", "launch.cpus_per_task=2",
            "launch.time=10", "launch.signal_grace_s=60", "launch.env.OMP_NUM_THREADS=1",
            f"launch.rdzv_port={RDZV_BASE}", *more]  # fmt: skip
    cmd = [sys.executable, "-m", "kmoe.cli", "launch", "slurm", "--config", TOY_CONFIG,
           "--run-dir", str(run_dir)]  # fmt: skip
    return subprocess.run(cmd + [a for s in sets for a in ("--set", s)], cwd=REPO, env=cluster.env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def gated(gate: Path) -> str:
    """A `launch.setup` override: the job waits for `gate` (a file the test writes) before it trains."""
    return "launch.setup=" + json.dumps([f"until [ -e {gate} ]; do sleep 0.1; done"])


def launch(cluster: LocalSlurm, shards: Path, run_dir: Path, *more: str) -> str:
    """Submit; the job id `kmoe launch slurm` prints."""
    proc = kmoe_launch(cluster, shards, run_dir, *more)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()[0]


def job_logs(run_dir: Path, job_id: str) -> str:
    out = [p.read_text()[-4000:] for p in (run_dir / f"slurm-{job_id}.out", run_dir / f"slurm-{job_id}.err")
           if p.is_file()]  # fmt: skip
    return "\n".join(out)


def ledger(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in ledger(run_dir) if r.get("kind") == "event" and r.get("event") == name]


def step_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}  # a resume's lines win


def audit_verify(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kmoe.cli", "audit", "verify", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def wait_for_first_step(cluster: LocalSlurm, run_dir: Path, job_id: str, timeout: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and '"loss"' in metrics.read_text():
            return
        state = cluster.command("squeue", "-h", "-j", job_id, "-o", "%T", check=False).strip()
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), (
            f"job {job_id} {state}:\n{job_logs(run_dir, job_id)}"
        )
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} logged no step in {timeout} s:\n{job_logs(run_dir, job_id)}")
