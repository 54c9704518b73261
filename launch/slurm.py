"""`kmoe launch slurm`: a run config becomes a checked sbatch script (templates/train.sbatch), then a job.

plan() resolves the config as `kmoe train` does (plus `--set` overrides), makes its paths absolute and checks
the parallel layout against `launch.nodes x ranks per node`; preflight() checks what would otherwise fail on
the nodes (data, run directory, job name, a job already training into it); render() fills the template; write() puts the resolved config and
the script into the run directory; submit() calls `sbatch --parsable` and records the job id.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kmoe.configtree import ConfigError, dump_yaml
from training.config import RunConfig, load_run_config, validate

TEMPLATES = Path(__file__).parent / "templates"
SCRIPT = "launch.sbatch"  # the rendered script, in the run directory
CONFIG = "launch-config.yaml"  # the resolved config every (re)start of the job trains with
HISTORY = "launch.json"  # job ids submitted for the run directory
JOB_NAME = re.compile(r"[A-Za-z0-9._+-]+")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}  # fmt: skip


@dataclass
class LaunchPlan:
    cfg: RunConfig  # resolved: overrides applied, data paths absolute
    source: str  # the config file it came from
    run_dir: Path  # absolute
    workdir: Path  # absolute: the job's working directory (sbatch --chdir)
    python: str  # interpreter on the nodes

    @property
    def config_path(self) -> Path:
        return self.run_dir / CONFIG

    @property
    def script_path(self) -> Path:
        return self.run_dir / SCRIPT

    def layout(self) -> dict[str, Any]:
        from training.dims import layout

        la = self.cfg.launch
        return {"nodes": la.nodes, "ranks_per_node": la.ranks_per_node, "gpus_per_node": la.gpus_per_node,
                **layout(self.cfg, la.world_size)}  # fmt: skip


def plan(config: str, overrides: list[str] | None = None, run_dir: str | None = None) -> LaunchPlan:
    """Load and validate `config` for `launch.nodes x ranks per node` ranks; relative paths are taken
    from the current directory, which becomes the job's working directory."""
    workdir = Path.cwd().resolve()
    cfg = load_run_config(config, overrides)
    data = cfg.data
    cfg = replace(cfg, data=replace(data, shards=_absolute(data.shards, workdir),
                                    tokenizer=_absolute(data.tokenizer, workdir)))  # fmt: skip
    la = cfg.launch
    where = f"{la.nodes} node(s) x {la.ranks_per_node} rank(s) = {la.world_size} ranks"
    try:
        validate(cfg, world_size=la.world_size)  # the engine's layout on this many ranks included
    except ValueError as e:
        raise ConfigError(f"{config}: {e} (launch: {where})") from None
    run = Path(run_dir) if run_dir else Path("runs") / cfg.name
    return LaunchPlan(cfg, str(config), (workdir / run).resolve(), workdir, la.python or sys.executable)


def _absolute(path: str, base: Path) -> str:
    return str((base / path).resolve()) if path else path


def preflight(p: LaunchPlan, submitting: bool = True) -> None:
    """What a job would fail on after waiting in the queue, checked now; a ValueError names the key."""
    from training.data import check_sources  # sets the filter for megatron-core's TransformerEngine warning

    if not JOB_NAME.fullmatch(p.cfg.name):
        raise ConfigError(f"name: {p.cfg.name!r} is the SLURM job name; use letters, digits and ._+- only")
    for what, path in (("--run-dir", p.run_dir), ("the working directory", p.workdir)):
        if re.search(r"[\s%]", str(path)):
            raise ValueError(f"{what}: {path} holds whitespace or '%', which #SBATCH lines cannot take")
    check_sources(p.cfg)
    if os.sep in p.python and not os.access(p.python, os.X_OK):
        raise ConfigError(f"launch.python: {p.python} is not an executable file")
    existing = next(d for d in (p.run_dir, *p.run_dir.parents) if d.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--run-dir: cannot create or write {p.run_dir} ({existing} is not writable)")
    if submitting and not shutil.which("sbatch"):
        raise ValueError(
            "sbatch not found on PATH: submit from a SLURM login node (or `kmoe launch local start`)"
        )
    if submitting and (live := _live_job(p.run_dir)):
        raise ValueError(
            f"--run-dir: job {live[0]} ({live[1]}) already trains into {p.run_dir}; two jobs would write the same "
            f"checkpoints and ledger: `scancel {live[0]}` first, or use another --run-dir"
        )


def _live_job(run_dir: Path) -> tuple[str, str] | None:
    """(job id, state) of the run directory's last job while SLURM has it queued or running."""
    history = read_history(run_dir)
    info = job_info(history[-1]["job_id"]) if history and shutil.which("scontrol") else None
    state = info.get("JobState", "") if info else ""
    return (history[-1]["job_id"], state) if info and state not in FINAL_STATES else None


def render(p: LaunchPlan) -> str:
    """The sbatch script of the plan (templates/train.sbatch)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["q"] = lambda v: shlex.quote(str(v))
    la = p.cfg.launch
    return env.get_template("train.sbatch").render(
        name=p.cfg.name, source=p.source, nodes=la.nodes, gpus_per_node=la.gpus_per_node,
        ranks_per_node=la.ranks_per_node, world_size=la.world_size, cpus_per_task=la.cpus_per_task,
        partition=la.partition, account=la.account, time=la.time, grace=la.signal_grace_s,
        requeue=la.requeue, max_requeues=la.max_requeues, rdzv_port=la.rdzv_port, setup=la.setup,
        env={k: str(v) for k, v in la.env.items()}, sbatch=la.sbatch, workdir=p.workdir, run_dir=p.run_dir,
        config=p.config_path, python=p.python,
    )  # fmt: skip


def write(p: LaunchPlan) -> Path:
    """The resolved config and the script into the run directory; returns the script's path."""
    p.run_dir.mkdir(parents=True, exist_ok=True)
    p.config_path.write_text(dump_yaml(p.cfg))
    p.script_path.write_text(render(p))
    p.script_path.chmod(0o755)
    return p.script_path


def submit(script: Path, run_dir: Path, env: dict[str, str] | None = None) -> str:
    """`sbatch --parsable SCRIPT`; returns the job id and appends it to the run's launch.json."""
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ValueError(f"sbatch refused {script}: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]  # "id" or "id;cluster"
    if not job_id.isdigit():
        raise ValueError(f"sbatch printed {proc.stdout.strip()!r}, not a job id")
    history = read_history(run_dir)
    history.append(
        {"job_id": job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "script": str(script)}
    )
    (Path(run_dir) / HISTORY).write_text(json.dumps({"jobs": history}, indent=1) + "\n")
    return job_id


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / HISTORY
    return json.loads(path.read_text())["jobs"] if path.is_file() else []


def job_info(job_id: str, env: dict[str, str] | None = None) -> dict[str, str] | None:
    """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...); None once SLURM forgot the job."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return parse_scontrol(proc.stdout)


def wait_job(
    job_id: str, env: dict[str, str] | None = None, timeout: float = 3600, poll: float = 0.5
) -> dict:
    """Wait for a job to end, through its requeues; its final `scontrol show job` fields."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] | None = None
    while time.monotonic() < deadline:
        info = job_info(job_id, env)
        if info is None:
            raise ValueError(f"job {job_id} is unknown to SLURM (or SLURM forgot it: MinJobAge)")
        if info.get("JobState") in FINAL_STATES:
            return info
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} still {info and info.get('JobState')} after {timeout:.0f} s")


def parse_scontrol(line: str) -> dict[str, str]:
    """`Key=value Key=value ...` of `scontrol show -o`; values may hold spaces (Command=, WorkDir=), so split
    before each `Key=` rather than on whitespace."""
    return dict(re.findall(r"(\w[\w:/]*)=(.*?)(?=\s+\w[\w:/]*=|\s*$)", line.strip()))
