"""The local SLURM (launch/localslurm.py) from a checkout inside a private (0700) folder, as `mktemp -d` makes and
many home folders are: munged refuses a socket below a folder others cannot enter, so the socket lives in a
folder of its own outside the checkout, and a real job runs to the end."""

from __future__ import annotations

import stat

import pytest

from launch.localslurm import LocalSlurm, socket_base, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no local SLURM: {unavailable()}")


def test_cluster_under_a_0700_folder_runs_a_job(tmp_path):
    private = tmp_path / "home"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    checkout = private / "kmoe"
    root = checkout / ".cache/slurm"
    out = checkout / "job.out"
    with LocalSlurm(root) as cluster:
        assert stat.S_IMODE(private.stat().st_mode) == 0o700  # left as the user made it
        sock = cluster.munge_socket
        assert sock.is_socket() and not sock.is_relative_to(private) and sock.is_relative_to(socket_base())
        assert f"AuthInfo=socket={sock}," in (root / "slurm.conf").read_text()  # where it is, recorded
        job = cluster.command(
            "sbatch", "--parsable", f"--output={out}", f"--chdir={checkout}", "--wrap", "echo ran in $PWD"
        ).strip()
        info = cluster.wait(job, timeout=120)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), cluster.log_tail()
        assert out.read_text().strip() == f"ran in {checkout}"
    assert not sock.parent.exists()  # stop() removes the socket folder
