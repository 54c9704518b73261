"""A two-node job on a local SLURM of two emulated nodes (launch/localslurm.py, SLURM's multiple-slurmd setup):
`kmoe launch slurm` runs one torchrun per node, 2 ranks each, the toy MoE with expert parallelism EP=2 under
FSDP2 over the 4 ranks. A job of the urgent partition preempts it; it checkpoints, requeues itself, resumes on
the two nodes, ends with the losses of an uninterrupted 4-rank run of the same layout bit for bit, and its
ledger verifies.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from multirank import run_distributed_test
from slurm_jobs import (
    TOY_CONFIG,
    audit_verify,
    events,
    job_logs,
    launch,
    ledger,
    step_losses,
    wait_for_first_step,
)

from launch.localslurm import LocalSlurm, unavailable

REPO = Path(__file__).resolve().parents[2]
STEPS = 40
LAYOUT = ["parallel.expert_parallel=2", "train.micro_batch_size=2"]  # 8 sequences over 4 ranks
pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no local SLURM: {unavailable()}")


@pytest.fixture(scope="module")
def cluster2():
    root = Path(tempfile.mkdtemp(prefix="kmoe-slurm2-"))
    with LocalSlurm(root, nodes=2) as c:
        yield c
    shutil.rmtree(root, ignore_errors=True)


def uninterrupted(shards: str, run_dir: str) -> int:
    """The same training on 4 in-process ranks, never stopped (the reference)."""
    from multirank import rank_info

    from training.config import load_run_config
    from training.trainer import Trainer

    sets = [f"data.shards={shards}", f"train.steps={STEPS}", "checkpoint.every=10", "train.eval_every=0",
            "log.wandb=false", *LAYOUT]  # fmt: skip
    return Trainer(load_run_config(TOY_CONFIG, sets), Path(run_dir), rank_info()).run("none")


def test_two_node_ep_job_is_preempted_requeued_and_resumes_exactly(cluster2, shards, tmp_path):
    run = tmp_path / "two-nodes"
    job = launch(cluster2, shards, run, f"train.steps={STEPS}", "checkpoint.every=10", "train.eval_every=0",
                 "launch.nodes=2", *LAYOUT)  # fmt: skip
    wait_for_first_step(cluster2, run, job, timeout=600)
    # Both nodes are busy with the job: the urgent job preempts it (TERM, checkpoint, requeue).
    urgent = cluster2.command("sbatch", "--parsable", "--partition=urgent", "--cpus-per-task=2",
                              "--output=/dev/null", "--wrap", "sleep 1").strip()  # fmt: skip
    assert cluster2.wait(urgent, timeout=300)["JobState"] == "COMPLETED"
    info = cluster2.wait(job, timeout=900)
    logs = job_logs(run, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), logs
    assert info["NumNodes"] == "2" and f"kmoe: job {job} (restarts: 1) on n[1-2]" in logs, logs
    start = next(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"start"' in x)
    assert {k: start["layout"][k] for k in ("world_size", "data_parallel", "expert_parallel", "strategy")} == {
        "world_size": 4, "data_parallel": 4, "expert_parallel": 2, "strategy": "fsdp"}  # fmt: skip
    (stop,) = events(run, "signal")
    assert stop["signal"] == "SIGTERM" and 1 <= stop["step"] < STEPS
    (resume,) = events(run, "resume")
    assert resume["step"] == stop["step"] and stop["step"] in [
        r["step"] for r in ledger(run) if r.get("kind") == "checkpoint"
    ]
    reference = tmp_path / "uninterrupted"
    assert run_distributed_test(uninterrupted, 4, args=(str(shards), str(reference))) == [0] * 4
    assert step_losses(run) == step_losses(reference)  # exact, every step, across the requeue
    verify = audit_verify(run)
    assert verify.returncode == 0, verify.stdout + verify.stderr
