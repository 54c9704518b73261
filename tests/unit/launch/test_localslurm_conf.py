"""The local cluster's slurm.conf (no daemons started): one node named after this machine, or emulated nodes
n1..nN each with its own slurmd port and its own spool, pid and log files (SLURM's multiple-slurmd setup)."""

import re

import pytest

from launch.localslurm import LocalSlurm


def test_two_emulated_nodes_have_their_own_ports_and_files(tmp_path):
    cluster = LocalSlurm(tmp_path, cpus=2, nodes=2)
    cluster._prepare()
    conf = cluster.conf.read_text()
    nodes = re.findall(
        r"^NodeName=(\S+) NodeHostname=\S+ NodeAddr=127\.0\.0\.1 Port=(\d+) CPUs=2", conf, re.M
    )
    assert [n for n, _ in nodes] == ["n1", "n2"] and len({p for _, p in nodes}) == 2
    assert "PartitionName=local Nodes=n1,n2 " in conf and "PartitionName=urgent Nodes=n1,n2 " in conf
    for key in ("SlurmdSpoolDir", "SlurmdPidFile", "SlurmdLogFile"):
        assert re.search(rf"^{key}=\S*%n", conf, re.M), key  # one per slurmd
    assert [p.name for p in cluster._pid_files()][-2:] == ["slurmd-n1.pid", "slurmd-n2.pid"]


def test_one_node_is_this_machine_and_zero_nodes_is_refused(tmp_path):
    cluster = LocalSlurm(tmp_path, cpus=2)
    cluster._prepare()
    assert cluster.nodes == [cluster.host]
    assert f"NodeName={cluster.host} " in cluster.conf.read_text()
    with pytest.raises(ValueError, match="--nodes: must be >= 1"):
        LocalSlurm(tmp_path, nodes=0)
