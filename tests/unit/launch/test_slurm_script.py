"""`kmoe launch slurm` without a cluster: the rendered sbatch script, the resolved config it trains with, and
the errors a user gets before anything is submitted."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from toy_shards import write_toy_shards

from kmoe.cli import main
from kmoe.configtree import ConfigError
from launch import slurm
from training.config import config_hash, load_run_config, slurm_time_seconds
from training.ledger import Ledger

TOY = str(Path(__file__).resolve().parents[3] / "configs/train/toy.yaml")
CPU = ["launch.gpus_per_node=0", "launch.procs_per_node=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_toy_shards(tmp_path_factory.mktemp("toy"), n_docs=20)


def lines(script: str) -> list[str]:
    return script.splitlines()


def bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "check.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_script_carries_the_launch_section(tmp_path):
    sets = ["launch.nodes=4", "launch.gpus_per_node=8", "launch.procs_per_node=0", "launch.cpus_per_task=0",
            "launch.partition=gpu", "launch.account=proj42", "launch.time=2-00:00:00",
            "launch.signal_grace_s=600", "launch.env.NCCL_DEBUG=INFO", "launch.sbatch=[--qos=high]",
            "launch.setup=[module load cuda/12.4, source /opt/venv/bin/activate]", "train.global_batch_size=128"]  # fmt: skip
    plan = slurm.plan(TOY, sets, run_dir=str(tmp_path / "run"))
    script = slurm.render(plan)
    run = tmp_path / "run"
    for line in ["#SBATCH --job-name=toy", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --account=proj42",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --signal=B:USR1@600", "#SBATCH --requeue",
                 "#SBATCH --qos=high", f"#SBATCH --output={run}/slurm-%j.out", f"#SBATCH --error={run}/slurm-%j.err",
                 f"#SBATCH --chdir={Path.cwd().resolve()}", "export NCCL_DEBUG=INFO", "module load cuda/12.4"]:  # fmt: skip
        assert line in lines(script), line
    assert "--nproc-per-node=8" in script and "--shutdown-timeout=600" in script
    assert f'train --config {run}/launch-config.yaml --run-dir "$RUN_DIR" --resume auto' in script
    assert script.index("source /opt/venv/bin/activate") < script.index("\nsrun ")  # setup runs first
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and '"$RESTARTS" -lt 20' in script
    assert "--cpus-per-task" not in script  # not asked for: the partition's default
    bash_syntax_ok(script, tmp_path)


def test_cpu_ranks_without_requeue(tmp_path):
    sets = [
        *CPU,
        "launch.cpus_per_task=2",
        "launch.requeue=false",
        "launch.time=30",
        "launch.signal_grace_s=60",
    ]
    script = slurm.render(slurm.plan(TOY, sets, run_dir=str(tmp_path / "run")))
    assert "--gpus-per-node" not in script
    assert "#SBATCH --cpus-per-task=2" in lines(script) and "srun --nodes=\"$SLURM_NNODES\" --ntasks-per-node=1 --cpus-per-task=2" in script  # fmt: skip
    assert "--nproc-per-node=2" in script and "#SBATCH --no-requeue" in lines(script)
    assert "scontrol requeue" not in script and "exit 75" in script  # stops; a person resubmits
    bash_syntax_ok(script, tmp_path)


def test_the_job_trains_with_the_resolved_config(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(shards.parent)
    plan = slurm.plan(
        TOY, [f"data.shards={shards.name}", *CPU, "train.lr=1e-3"], run_dir=str(tmp_path / "run")
    )
    slurm.preflight(plan, submitting=False)
    script = slurm.write(plan)
    assert script == tmp_path / "run/launch.sbatch" and script.stat().st_mode & 0o111
    written = load_run_config(plan.config_path)
    assert written.data.shards == str(shards.resolve())  # the nodes need no working directory to find it
    assert written.train.lr == 1e-3 and config_hash(written) == config_hash(plan.cfg)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["launch.nodes=2", *CPU], "train.global_batch_size"),  # 8 sequences, 4 ranks x micro-batch 4
        ([*CPU, "parallel.strategy=single"], "parallel.strategy"),
        (["launch.gpus_per_node=0", "launch.procs_per_node=0"], "launch.procs_per_node"),
        (["launch.time=1h"], "launch.time"),
    ],
)
def test_layout_and_launch_errors_name_the_key(sets, message):
    with pytest.raises(ValueError) as e:
        slurm.plan(TOY, sets)
    assert message in str(e.value) and "toy.yaml" in str(e.value)


def test_layout_error_says_the_launch_shape():
    with pytest.raises(ConfigError, match=r"launch: 2 node\(s\) x 2 rank\(s\) = 4 ranks"):
        slurm.plan(TOY, ["launch.nodes=2", *CPU])


@pytest.mark.parametrize(
    "case, message",
    [
        ("no shards", "data.shards"),
        ("name", "name: 'my run'"),
        ("run dir under a file", "--run-dir"),
        ("python", "launch.python"),
        ("no sbatch", "sbatch not found"),
        ("a continued run without its key", "signing key"),
    ],
)
def test_preflight_refuses_what_would_fail_on_the_nodes(shards, tmp_path, monkeypatch, case, message):
    sets, run_dir = [f"data.shards={shards}", *CPU], tmp_path / "run"
    if case == "no shards":
        sets[0] = f"data.shards={tmp_path}"
    if case == "name":
        sets.append("name=my run")
    if case == "run dir under a file":
        (tmp_path / "file").write_text("")
        run_dir = tmp_path / "file/run"
    if case == "python":
        sets.append(f"launch.python={tmp_path}/nopython")
    if case == "no sbatch":
        monkeypatch.setenv("PATH", str(tmp_path))
    if case == "a continued run without its key":  # a run moved here without its key dir
        ledger = Ledger.open(tmp_path / "scratch" / "run")
        ledger.genesis(config={}, seed=1, init_state={"w": "0" * 64})
        ledger.close()
        run_dir.mkdir()
        (run_dir / "ledger.jsonl").write_bytes((tmp_path / "scratch/run/ledger.jsonl").read_bytes())
    plan = slurm.plan(TOY, sets, run_dir=str(run_dir))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        slurm.preflight(plan)


def test_dry_run_prints_script_and_layout_and_writes_nothing(shards, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["launch", "slurm", "--config", TOY, "--run-dir", str(run), "--dry-run"]
    assert main(args + [a for s in [f"data.shards={shards}", *CPU] for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#SBATCH --signal=B:USR1@60" in out  # toy.yaml's grace
    assert (
        '# layout: {"nodes": 1, "ranks_per_node": 2, "gpus_per_node": 0' in out and '"world_size": 2' in out
    )
    assert not run.exists()


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90", 5400),
        ("1:30", 90),
        ("04:00:00", 14400),
        ("2-00:00:00", 172800),
        ("1-2", 93600),
        ("1-2:30", 95400),
    ],
)
def test_slurm_time_formats(text, seconds):
    assert slurm_time_seconds(text) == seconds


@pytest.mark.parametrize("text", ["1h", "1:2:3:4", "-5", "1-", "", "UNLIMITED"])
def test_slurm_time_refuses_what_sbatch_would(text):
    with pytest.raises(ValueError, match="not a SLURM time"):
        slurm_time_seconds(text)


def test_scontrol_fields_keep_values_with_spaces():
    line = ("JobId=1 JobName=job script.sh UserId=root(0) JobState=COMPLETED Requeue=1 Restarts=0 ExitCode=0:0 "
            "ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 Socks/Node=* Command=/tmp/a dir/job script.sh "
            "WorkDir=/tmp/a dir StdOut=/dev/null Power= ")  # fmt: skip
    info = slurm.parse_scontrol(line)
    assert info["JobName"] == "job script.sh" and info["Command"] == "/tmp/a dir/job script.sh"
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "0", "0:0")
    assert (
        info["TRES"] == "cpu=1,node=1,billing=1" and info["ReqB:S:C:T"] == "0:0:*:*" and info["Power"] == ""
    )
