"""`kmoe launch slurm` on a real SLURM (launch/localslurm.py: munged, slurmctld, slurmd on this machine).

The toy MoE trains as one job of 2 CPU ranks (torchrun, gloo DDP) to the end. Another job gets SLURM's
pre-time-limit signal (USR1 to the batch shell) mid-run, a third is preempted by a job of a higher-priority
partition (TERM to its step); each checkpoints, requeues itself under the same job id, resumes, and ends with
the uninterrupted job's per-step losses bit for bit. Every ledger verifies.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import TOY_CONFIG

from kmoe.cli import main
from launch.localslurm import LocalSlurm, unavailable

REPO = Path(__file__).resolve().parents[2]
STEPS = 150  # ~3 s of training: time enough to signal the job mid-run
# Job ids restart at 1 on every private cluster: a random base keeps concurrent test sessions' rendezvous apart.
RDZV_BASE = random.randint(20000, 40000)
pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no local SLURM: {unavailable()}")


@pytest.fixture(scope="module")
def cluster():
    # munged wants every folder up to its socket enterable by all users; pytest's tmp folders are 0700.
    root = Path(tempfile.mkdtemp(prefix="kmoe-slurm-"))
    with LocalSlurm(root) as c:
        yield c
    shutil.rmtree(root, ignore_errors=True)


def kmoe_launch(cluster: LocalSlurm, shards: Path, run_dir: Path) -> subprocess.CompletedProcess:
    """`kmoe launch slurm` of the toy config as 2 CPU ranks."""
    sets = [f"data.shards={shards}", f"train.steps={STEPS}", "checkpoint.every=50", "train.eval_every=50",
            "log.wandb=false", "launch.gpus_per_node=0", "launch.procs_per_node=2", "launch.cpus_per_task=2",
            "launch.time=10", "launch.signal_grace_s=60", "launch.env.OMP_NUM_THREADS=1",
            f"launch.rdzv_port={RDZV_BASE}"]  # fmt: skip
    cmd = [sys.executable, "-m", "kmoe.cli", "launch", "slurm", "--config", TOY_CONFIG,
           "--run-dir", str(run_dir)]  # fmt: skip
    return subprocess.run(cmd + [a for s in sets for a in ("--set", s)], cwd=REPO, env=cluster.env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def launch(cluster: LocalSlurm, shards: Path, run_dir: Path) -> str:
    """Submit; the job id `kmoe launch slurm` prints."""
    proc = kmoe_launch(cluster, shards, run_dir)
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


@pytest.fixture(scope="module")
def straight(cluster, shards, tmp_path_factory) -> tuple[Path, str, dict, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("launch") / "straight"
    job = launch(cluster, shards, run)
    again = kmoe_launch(cluster, shards, run)  # while the first job is queued or running
    return run, job, cluster.wait(job, timeout=300), again


def test_job_trains_to_the_end_and_its_ledger_verifies(straight):
    run, job, info, again = straight
    assert again.returncode == 2 and f"job {job} (" in again.stderr and "already trains into" in again.stderr
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), job_logs(
        run, job
    )
    assert sorted(step_losses(run)) == list(range(1, STEPS + 1))
    start = next(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"start"' in x)
    assert (start["layout"]["strategy"], start["layout"]["world_size"]) == (
        "ddp",
        2,
    )  # 2 ranks under torchrun
    assert [e["status"] for e in events(run, "end")] == ["completed"]
    assert f"kmoe: job {job} (restarts: 0)" in (run / f"slurm-{job}.out").read_text()
    verify = audit_verify(run)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def assert_stopped_requeued_and_resumed(
    run: Path, job: str, info: dict, signal: str, reference: Path
) -> None:
    """One job id, one restart; a checkpoint at the stop step, a resume from it, the reference's losses."""
    logs = job_logs(run, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), logs
    out = (run / f"slurm-{job}.out").read_text()
    assert f"kmoe: job {job} (restarts: 0)" in out and f"kmoe: job {job} (restarts: 1)" in out, logs
    assert [j["job_id"] for j in json.loads((run / "launch.json").read_text())["jobs"]] == [
        job
    ]  # no resubmit
    (stop,) = events(run, "signal")
    assert stop["signal"] == signal
    assert 1 <= stop["step"] < STEPS, f"the job finished before the signal took effect (step {stop['step']})"
    assert stop["step"] in [
        r["step"] for r in ledger(run) if r.get("kind") == "checkpoint"
    ]  # checkpointed there
    assert [e["status"] for e in events(run, "end")] == ["requeue", "completed"]
    (resume,) = events(run, "resume")
    assert (resume["step"], resume["checkpoint"]) == (stop["step"], f"checkpoints/step-{stop['step']:08d}")
    assert not (run / "requeue.json").exists()  # the resumed run removed the marker
    assert step_losses(run) == step_losses(reference)  # exact float equality, every step
    verify = audit_verify(run)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_time_limit_signal_checkpoints_requeues_the_job_and_it_resumes_bit_exactly(
    cluster, shards, straight, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "time-limit"
    job = launch(cluster, shards, run)
    wait_for_first_step(cluster, run, job)
    # What SLURM does signal_grace_s before the time limit (--signal=B:USR1@...): USR1 to the batch shell only.
    cluster.command("scancel", "--signal=USR1", "--batch", job)
    info = cluster.wait(job, timeout=300)
    assert_stopped_requeued_and_resumed(run, job, info, "SIGUSR1", reference=straight[0])
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    assert main(["launch", "status", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"job {job} submitted" in out and "COMPLETED restarts=1 exit=0:0" in out
    assert f"step {STEPS}, ended: completed; stop signals 1, resumes 1" in out


def test_preempted_job_checkpoints_and_resumes_after_the_urgent_job_bit_exactly(
    cluster, shards, straight, tmp_path
):
    run = tmp_path / "preempted"
    job = launch(cluster, shards, run)
    wait_for_first_step(cluster, run, job)
    # A job of the higher-priority partition needs the CPUs: SLURM preempts the training (SIGTERM to its
    # step, GraceTime to stop, PreemptMode=REQUEUE) and starts it again once the urgent job is done.
    urgent = cluster.command("sbatch", "--parsable", "--partition=urgent", "--cpus-per-task=2",
                             "--output=/dev/null", "--wrap", "sleep 1").strip()  # fmt: skip
    assert cluster.wait(urgent, timeout=120)["JobState"] == "COMPLETED"
    info = cluster.wait(job, timeout=300)
    assert_stopped_requeued_and_resumed(run, job, info, "SIGTERM", reference=straight[0])
