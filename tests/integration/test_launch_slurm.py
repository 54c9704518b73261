"""`kmoe launch slurm` on a real SLURM (launch/localslurm.py: munged, slurmctld, slurmd on this machine).

The toy MoE trains as one job of 2 CPU ranks (torchrun, gloo DDP) to the end. Another job gets SLURM's
pre-time-limit signal (USR1 to the batch shell) mid-run, a third is preempted by a job of a higher-priority
partition (TERM to its step); each checkpoints, requeues itself under the same job id, resumes, and ends with
the uninterrupted job's per-step losses bit for bit. Every ledger verifies.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from slurm_jobs import (
    STEPS,
    audit_verify,
    events,
    gated,
    job_logs,
    kmoe_launch,
    launch,
    ledger,
    step_losses,
    wait_for_first_step,
)

from kmoe.cli import main
from launch.localslurm import LocalSlurm, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no local SLURM: {unavailable()}")


@pytest.fixture(scope="module")
def cluster():
    # munged wants every folder up to its socket enterable by all users; pytest's tmp folders are 0700.
    root = Path(tempfile.mkdtemp(prefix="kmoe-slurm-"))
    with LocalSlurm(root) as c:
        yield c
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def straight(cluster, shards, tmp_path_factory) -> tuple[Path, str, dict, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("launch") / "straight"
    gate = run.parent / "go"
    job = launch(cluster, shards, run, gated(gate))
    # The job waits for the gate, so it is still queued or running however slow this launch is.
    again = kmoe_launch(cluster, shards, run, gated(gate))
    gate.touch()
    return run, job, cluster.wait(job, timeout=600), again


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
    info = cluster.wait(job, timeout=600)
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
    assert cluster.wait(urgent, timeout=300)["JobState"] == "COMPLETED"
    info = cluster.wait(job, timeout=600)
    assert_stopped_requeued_and_resumed(run, job, info, "SIGTERM", reference=straight[0])
