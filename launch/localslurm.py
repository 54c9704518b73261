"""A private SLURM cluster on this machine: munged, slurmctld and one slurmd per emulated node, all state under
one folder.

All but the sockets: munged refuses a socket below any folder that not every user may enter (a checkout
under a 0700 home or `mktemp -d` folder), and every socket path must fit AF_UNIX's 108 bytes (slurmstepd makes
one per job step in the slurmd spool, `<spool>/<node>/<node>_<job>.<step>`, which a checkout under a long
path overflows). So munged's socket and the slurmd spools go to a folder of its own under /run (else the temp
dir), named by the cluster root's hash and recorded in `<root>/slurm.conf` (AuthInfo=socket=...,
SlurmdSpoolDir=...). `unavailable()` says before anything starts when no such folder is possible.

For the launch tests and for trying `kmoe launch slurm` on one machine (Debian: `apt-get install
slurm-wlm`). It needs root (slurmd starts job steps as their user) but no systemd and no cgroups: processes
are tracked by parent id (proctrack/linuxproc), tasks are not pinned (task/none), and the ports are free
ones picked at start, so it runs beside a real SLURM installation without touching it. Jobs see it through
`SLURM_CONF=<root>/slurm.conf` (see `env()`).

With `nodes` > 1 it emulates that many nodes as SLURM's multiple-slurmd setup allows: nodes n1..nN share this
machine's address and CPUs, each slurmd (`slurmd -N n<i>`) listens on its own port with its own spool, pid
and log files, so multi-node jobs (`srun --nodes=2`, a torchrun per node meeting at the first node's address)
run here as they would on a cluster.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from launch.slurm import wait_job

log = logging.getLogger(__name__)
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun", "sinfo")
# A requeued job waits `cred_expire` seconds before it may start again (SLURM's default: 120).
REQUEUE_DELAY_S = 5
PREEMPT_GRACE_S = 60  # a preempted job's time to checkpoint (partition GraceTime)

SLURM_CONF = """\
# A one-node SLURM cluster of kmoe's launch/localslurm.py; all state under {root}.
ClusterName=kmoelocal
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket},cred_expire={requeue_delay}
StateSaveLocation={root}/state
SlurmdSpoolDir={spool}/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
# No systemd or cgroups here: track processes by parent id, do not pin tasks, gather no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
ReturnToService=2
KillWait=30
MinJobAge=600
# Jobs of `urgent` preempt jobs of `local`: SIGTERM to their steps, {grace} s to stop, then requeue.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{node_lines}
PartitionName=local Nodes={node_list} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime={grace}
PartitionName=urgent Nodes={node_list} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
"""
# One line per node: its own slurmd port; several nodes share this machine's name and address.
NODE_LINE = "NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} State=UNKNOWN"


def unavailable() -> str | None:
    """Why a local cluster cannot start here, or None when it can."""
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)} missing): apt-get install slurm-wlm"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd launches job steps as their user)"
    if socket_base() is None:
        return (
            f"munged needs its socket in a folder every user can enter; neither /run nor {tempfile.gettempdir()} "
            "is writable here with every folder above it enterable by all"
        )
    return None


def _enterable_by_all(folder: Path) -> bool:
    """munged's rule for a socket folder's ancestors: execute permission for everyone on each of them."""
    try:
        return all(p.stat().st_mode & stat.S_IXOTH for p in (folder, *folder.parents))
    except OSError:
        return False


def socket_base() -> Path | None:
    """Where munge socket folders go: /run when usable, else the temp dir; None when neither is."""
    for base in (Path("/run"), Path(tempfile.gettempdir()).resolve()):
        if base.is_dir() and os.access(base, os.W_OK | os.X_OK) and _enterable_by_all(base):
            return base
    return None


def munge_socket(root: Path) -> Path:
    """munged's socket of the cluster at `root`: `<base>/kmoe-munge-<hash of root>/munge.sock`."""
    base = socket_base() or Path(tempfile.gettempdir())
    return base / f"kmoe-munge-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}" / "munge.sock"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid(path: Path) -> int | None:
    """The live process of a pid file (a zombie counts as gone: init reaps daemons late)."""
    try:
        pid = int(path.read_text().split()[0])
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return None if state in ("Z", "X") else pid
    except (OSError, ValueError, IndexError):
        return None


def _until(done, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


class LocalSlurm:
    """Start with `start()` (or `with LocalSlurm(root) as cluster:`), stop with `stop()`."""

    def __init__(self, root: str | Path, cpus: int | None = None, nodes: int = 1):
        if nodes < 1:
            raise ValueError(f"--nodes: must be >= 1, got {nodes}")
        self.root = Path(root).resolve()
        self.cpus = cpus or len(os.sched_getaffinity(0))
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = munge_socket(self.root)
        self.spool = self.munge_socket.parent / "spool"  # short paths for slurmstepd's sockets
        # One node keeps this machine's name; emulated nodes are n1..nN (each node's CPUs are all of them).
        self.nodes = [self.host] if nodes == 1 else [f"n{i}" for i in range(1, nodes + 1)]

    def env(self) -> dict[str, str]:
        """The environment of a SLURM command (or a job submitted) on this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _pid_files(self) -> list[Path]:
        daemons = ["munged", "slurmctld"] + [f"slurmd-{n}" for n in self.nodes]
        return [self.root / "run" / f"{d}.pid" for d in daemons]

    def running(self) -> bool:
        return all(_pid(f) for f in self._pid_files())

    def start(self, timeout: float = 60) -> LocalSlurm:
        """Start munged, slurmctld and a slurmd per node (a no-op when they run); wait until every node takes
        jobs."""
        why = unavailable()
        if why:
            raise ValueError(why)
        if self.running():
            return self
        if _pid(self.root / "run/slurmctld.pid"):
            raise ValueError(f"a local SLURM with other nodes runs under {self.root}; stop it first")
        self._prepare()
        self._start_munge()
        self._run(["slurmctld", "-f", str(self.conf)])
        for node in self.nodes:
            (self.spool / node).mkdir(parents=True, exist_ok=True)
            self._run(["slurmd", "-f", str(self.conf), "-N", node])
        if not _until(self._node_up, timeout):
            raise RuntimeError(
                f"the local SLURM nodes did not come up in {timeout:.0f} s:\n{self.log_tail()}"
            )
        log.info("local SLURM up: SLURM_CONF=%s", self.conf)
        return self

    def _node_up(self) -> bool:
        states = self.command("sinfo", "-h", "-N", "-o", "%N %T", check=False).split("\n")
        up = {line.split()[0] for line in states if len(line.split()) == 2 and line.split()[1] in
              ("idle", "mixed", "allocated")}  # fmt: skip
        return up >= set(self.nodes)

    def _prepare(self) -> None:
        # munged refuses a socket folder that others cannot enter and a key that others can read.
        for sub, mode in (("", 0o755), ("run", 0o755), ("log", 0o755), ("state", 0o700), ("munge", 0o700)):  # fmt: skip
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            (self.root / sub).chmod(mode)
        self.munge_socket.parent.mkdir(mode=0o755, exist_ok=True)
        self.munge_socket.parent.chmod(0o755)
        key = self.root / "munge/munge.key"
        if not key.is_file():
            key.write_bytes(os.urandom(128))
            key.chmod(0o400)
        lines = [
            NODE_LINE.format(name=n, host=self.host, port=_free_port(), cpus=self.cpus) for n in self.nodes
        ]
        self.conf.write_text(
            SLURM_CONF.format(
                root=self.root,
                socket=self.munge_socket,
                spool=self.spool,
                host=self.host,
                ctld_port=_free_port(),
                requeue_delay=REQUEUE_DELAY_S,
                grace=PREEMPT_GRACE_S,
                node_lines="\n".join(lines),
                node_list=",".join(self.nodes),
            )  # fmt: skip
        )

    def _start_munge(self) -> None:
        r = self.root
        self._run(["munged", f"--key-file={r}/munge/munge.key", f"--socket={self.munge_socket}",
                   f"--pid-file={r}/run/munged.pid", f"--log-file={r}/log/munged.log",
                   f"--seed-file={r}/munge/munged.seed"])  # fmt: skip

    def _run(self, cmd: list[str]) -> None:
        """Start a daemon (it forks into the background and writes its pid file)."""
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env())
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}\n{self.log_tail()}")

    def command(self, *args: str, check: bool = True) -> str:
        """Run a SLURM client command on this cluster; its stdout."""
        proc = subprocess.run(list(args), capture_output=True, text=True, env=self.env())
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        """Wait for a job to end (requeues included); its final `scontrol show job` fields."""
        return wait_job(job_id, self.env(), timeout)

    def stop(self, timeout: float = 30) -> None:
        """Cancel the jobs, stop slurmd and slurmctld, then munged (each by the pid in its pid file)."""
        if _pid(self.root / "run/slurmctld.pid"):
            jobs = self.command("squeue", "-h", "-o", "%i", check=False).split()
            if jobs:
                self.command("scancel", *jobs, check=False)
                _until(lambda: not self.command("squeue", "-h", "-o", "%i", check=False).strip(), timeout)
            self.command("scontrol", "shutdown", check=False)
        run = self.root / "run"  # every slurmd that runs, whatever node count it was started with
        for pid_file in [*sorted(run.glob("slurmd-*.pid")), run / "slurmctld.pid", run / "munged.pid"]:
            daemon = pid_file.stem
            if daemon != "munged" and _until(lambda f=pid_file: _pid(f) is None, timeout / 2):
                continue  # scontrol shutdown stopped it
            if pid := _pid(pid_file):
                os.kill(pid, signal.SIGTERM)
                _until(lambda f=pid_file: _pid(f) is None, timeout / 2)
        if _pid(self.root / "run/munged.pid") is None:
            shutil.rmtree(self.munge_socket.parent, ignore_errors=True)

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for name in ("slurmctld.log", *(f"slurmd-{n}.log" for n in self.nodes), "munged.log"):
            path = self.root / "log" / name
            if path.is_file():
                out.append(
                    f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                )
        return "\n".join(out)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
