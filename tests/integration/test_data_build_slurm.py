"""`kmoe data build` under the SLURM executor on a local SLURM of two emulated nodes (launch/localslurm.py):
every stage an array job depending on the previous one, tasks spread over both nodes, and the same manifest
root as the local build. One shards task is killed in the middle of its work; the relaunch runs that task
alone, leaves the finished tasks' outputs untouched and ends at the same root.

The killed task is stopped at a known point without a test hook: `code` has a token budget, so only shards
task 0 reads the code corpus, and its kept file is swapped for a FIFO before the stage is released: task 0
writes its ko/en/ja parts, then blocks opening the FIFO (no writer), where it is cancelled. Every wait is on
a job state or a file, never on a duration.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from data_prep.config import load_data_config
from data_prep.pipeline import build
from launch.localslurm import LocalSlurm, unavailable
from launch.slurm import FINAL_STATES, parse_scontrol

REPO = Path(__file__).resolve().parents[2]
TASKS = 4
pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(unavailable() is not None, reason=f"no local SLURM: {unavailable()}"),
]


def data_config(tokenizer: str | None):
    cfg = load_data_config(f"{REPO}/configs/data/demo.yaml")
    cfg.cache_dir = f"{REPO}/.cache/data-test"
    for s in cfg.sources:
        s.max_mb = 0.3
    cfg.mix.max_tokens = {"code": 10**9}  # never reached; makes code one part, written by task 0 alone
    cfg.executor.tasks, cfg.executor.workers = TASKS, 2
    if tokenizer:
        cfg.tokenizer.path, cfg.tokenizer.train = tokenizer, None
    else:
        cfg.tokenizer.train = {"vocab_size": 3000, "sample_chars": 300_000, "num_reserved": 2}
    return cfg


def slurm_config(tokenizer: str):
    cfg = data_config(tokenizer)
    cfg.executor.kind, cfg.executor.workers = "slurm", TASKS  # all 4 at once: 2 CPUs on each of 2 nodes
    s = cfg.executor.slurm
    s.partition, s.time, s.mem_per_cpu_gb = "local", "00:30:00", 0  # the emulated nodes declare no memory
    s.venv_path = f"{REPO}/.venv/bin/activate"
    return cfg


def until(cond, what: str, timeout: float = 600):
    """Poll a state (job states, files); the timeout only bounds a hung test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def tasks_of(cluster: LocalSlurm, job) -> list[dict[str, str]]:
    """One record per array task of a job (scontrol lists each task once it is split out of the array)."""
    out = cluster.command("scontrol", "show", "job", "-o", str(job), check=False)
    return [parse_scontrol(line) for line in out.splitlines() if line.strip()]


def wait_done(cluster: LocalSlurm, job) -> list[dict[str, str]]:
    until(lambda: all(t["JobState"] in FINAL_STATES for t in tasks_of(cluster, job) or [{"JobState": ""}]),
          f"job {job} did not end")  # fmt: skip
    return tasks_of(cluster, job)


@pytest.fixture(scope="module")
def cluster2():
    root = Path(tempfile.mkdtemp(prefix="kmoe-slurm2d-"))
    with LocalSlurm(root, nodes=2) as c:
        yield c
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def local_build(tmp_path_factory):
    """A tokenizer trained by a first local build, then the local reference build with it."""
    root = tmp_path_factory.mktemp("local")
    build(data_config(None), root / "first")
    tokenizer = str(root / "first" / "tokenizer")
    return tokenizer, build(data_config(tokenizer), root / "ref")


def test_two_node_slurm_build_equals_local_and_a_killed_task_is_redone_alone(
    cluster2, local_build, tmp_path, monkeypatch
):
    tokenizer, ref = local_build
    monkeypatch.setenv("SLURM_CONF", str(cluster2.conf))
    out = tmp_path / "slurm"
    shards_logs = out / "work" / "logs" / "shards"
    # Submit while the partition is down, hold the shards stage: nothing can start before the FIFO is in place.
    cluster2.command("scontrol", "update", "PartitionName=local", "State=DOWN")
    jobs = build(slurm_config(tokenizer), out)["slurm_jobs"]
    assert list(jobs) == ["text", "dedup", "shards", "finalize"] and -1 not in jobs.values()
    assert {t["JobState"] for t in tasks_of(cluster2, jobs["text"])} == {"PENDING"}
    cluster2.command("scontrol", "hold", str(jobs["shards"]))
    cluster2.command("scontrol", "update", "PartitionName=local", "State=UP")
    text = wait_done(cluster2, jobs["text"])
    assert [t["JobState"] for t in text] == ["COMPLETED"] * TASKS
    assert {t["NodeList"] for t in text} == {"n1", "n2"}  # the array ran on both nodes
    assert [t["JobState"] for t in wait_done(cluster2, jobs["dedup"])] == ["COMPLETED"]

    (code,) = sorted((out / "corpus" / "kept" / "code").glob("*.jsonl.gz"))
    code.rename(tmp_path / "code.jsonl.gz")
    os.mkfifo(code)
    cluster2.command("scontrol", "release", str(jobs["shards"]))
    until(lambda: sorted(p.name for p in (shards_logs / "completions").glob("*")) == ["00001", "00002", "00003"]
          and (out / "shards" / "ja-00000.bin").is_file(), "shards tasks 1-3 and task 0's ja part")  # fmt: skip
    (task0,) = [t for t in tasks_of(cluster2, jobs["shards"]) if t["ArrayTaskId"] == "0"]
    assert task0["JobState"] == "RUNNING"  # blocked on the FIFO: mid-stage, parts ko/en/ja written
    cluster2.command("scancel", f"{jobs['shards']}_0")
    until(lambda: [t["JobState"] for t in tasks_of(cluster2, jobs["shards"]) if t["ArrayTaskId"] == "0"]
          == ["CANCELLED"], "task 0 cancelled")  # fmt: skip
    cluster2.command("scancel", str(jobs["finalize"]))  # its dependency can no longer be met
    code.unlink()
    (tmp_path / "code.jsonl.gz").rename(code)
    finished = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*-0000[123].*")}
    assert len(finished) == 3 * 3 * 2  # ko/en/ja parts 1-3 (code is one part), .bin and .idx

    again = build(slurm_config(tokenizer), out)["slurm_jobs"]
    assert again["text"] == again["dedup"] == -1  # every task of these stages is complete: nothing submitted
    assert json.loads((shards_logs / "ranks_to_run.json").read_text()) == [0]  # the killed task alone
    assert [t["JobState"] for t in wait_done(cluster2, again["finalize"])] == ["COMPLETED"]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["root_hash"] == ref["root_hash"] and manifest["files"] == ref["files"]
