"""The local test cluster is a real Slurm cluster behind a real sshd: check what later issues rely on."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from catalog.models import Cluster, NodeGroup
from portal import ssh as portal_ssh
from portal.slurm.gres import gpu_counts
from portal.ssh import SSHPool, SSHTarget

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]

EXAMPLE_CATALOG = Path(__file__).resolve().parents[2] / "catalog" / "examples" / "catalog.yaml"


def target_for(cluster: Cluster, local: dict[str, Any]) -> SSHTarget:
    """Reach the cluster the way the portal does: only the catalog's pinned host key is trusted."""
    return SSHTarget(
        host=cluster.login_host,
        port=cluster.ssh_port,
        username=local["user"],
        host_keys=cluster.host_key,
        private_key=Path(local["private_key"]).read_text(),
    )


class Shell:
    def __init__(self, pool: SSHPool, target: SSHTarget) -> None:
        self.pool, self.target = pool, target

    def __call__(self, command: str) -> tuple[int, str, str]:
        result = self.pool.run(self.target, command, timeout_s=30)
        return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def ssh(local_catalog: dict[str, Any]) -> Iterator[Shell]:
    pool = SSHPool()
    yield Shell(pool, target_for(Cluster.objects.get(slug="local"), local_catalog))
    pool.close_all()


def wait_for_job(run: Shell, job_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, out, _ = run(f"scontrol show job {job_id} -o")
        match = re.search(r"JobState=(\w+)", out)
        if code == 0 and match and match.group(1) in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}:
            return match.group(1)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_paramiko_with_the_pinned_key_sees_both_partitions_and_gpu_types(ssh: Shell) -> None:
    code, out, err = ssh("sinfo -h -o '%P %G'")
    assert code == 0, err
    partitions = {line.split()[0].rstrip("*") for line in out.splitlines()}
    gpu_types = set(re.findall(r"gpu:(\w+):\d", out))
    assert partitions == {"gpu", "gpu_devel"}
    assert gpu_types == {"a100", "h100"}


def test_a_large_output_arrives_whole_to_its_last_byte(local_catalog: dict[str, Any]) -> None:
    # sshd may send the exit status while output still waits for window space: reading must go on to EOF.
    # Seen before the fix: 7 of 30 reads on fresh connections came back short.
    cluster = Cluster.objects.get(slug="local")
    for _ in range(20):
        result = SSHPool().run(target_for(cluster, local_catalog), "head -c 900000 /dev/zero | tr '\\0' a; echo END")
        assert result.exit_code == 0 and len(result.stdout) == 900004 and result.stdout.endswith("aEND\n")
    streamed = b"".join(SSHPool().read(target_for(cluster, local_catalog), "head -c 3000000 /dev/zero"))
    assert len(streamed) == 3_000_000  # past the 1 MiB that run() keeps: read() streams it all
    with pytest.raises(portal_ssh.SSHError, match="No such file"):
        b"".join(SSHPool().read(target_for(cluster, local_catalog), "cat /nonexistent/output.jsonl"))


def test_a_different_host_key_is_rejected(local_catalog: dict[str, Any]) -> None:
    cluster = Cluster.objects.get(slug="local")
    _, impostor = portal_ssh.generate_keypair("impostor")
    cluster.host_key = f"[127.0.0.1]:{cluster.ssh_port} {impostor}"
    with pytest.raises(portal_ssh.HostKeyMismatch):
        SSHPool().run(target_for(cluster, local_catalog), "sinfo")


def test_an_unpinned_host_is_refused_not_added(local_catalog: dict[str, Any]) -> None:
    cluster = Cluster.objects.get(slug="local")
    cluster.host_key = ""
    with pytest.raises(portal_ssh.HostKeyNotPinned):
        SSHPool().run(target_for(cluster, local_catalog), "sinfo")


def test_jobs_run_as_the_unprivileged_cluster_user_with_gpus_assigned(
    ssh: Shell, local_catalog: dict[str, Any]
) -> None:
    tag = uuid.uuid4().hex[:8]
    code, out, err = ssh(
        f"sbatch --parsable -J t-{tag} -p gpu --gres=gpu:h100:2 -o t-{tag}.out "
        "--wrap='echo user=$(id -un) uid=$(id -u) gpus=$CUDA_VISIBLE_DEVICES node=$SLURMD_NODENAME'",
    )
    assert code == 0, err
    job_id = out.strip()
    assert wait_for_job(ssh, job_id) == "COMPLETED"
    code, out, _ = ssh(f"cat t-{tag}.out && rm -f t-{tag}.out")
    assert f"user={local_catalog['user']}" in out
    assert "uid=0" not in out
    assert "gpus=0,1" in out
    assert "node=node3" in out  # the only node with h100s
    code, out, _ = ssh(f"grep -h 'JobId={job_id} ' {local_catalog['jobcomp_log']}")
    assert "JobState=COMPLETED" in out  # finished jobs are on record for the portal to look up


def test_impossible_requests_are_rejected_at_submit(ssh: Shell) -> None:
    code, _, err = ssh("sbatch -p gpu --gres=gpu:a100:3 --wrap=true")
    assert code != 0
    assert "Requested node configuration is not available" in err
    code, _, err = ssh("sbatch -p gpu_devel --gres=gpu:h100:1 -t 03:00:00 --wrap=true")
    assert code != 0  # above the devel partition's 2 h limit
    assert "time limit" in err.lower()


def test_test_only_gives_a_start_estimate(ssh: Shell) -> None:
    code, _, err = ssh("sbatch --test-only -p gpu --gres=gpu:a100:1 --constraint=a100-80g --wrap=true")
    assert code == 0, err
    assert re.search(
        r"Job \d+ to start at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d using \d+ processors on nodes node[12] "
        r"in partition gpu",
        err,
    ), err


def test_multi_node_jobs_run_one_task_per_node(ssh: Shell) -> None:
    tag = uuid.uuid4().hex[:8]
    code, out, err = ssh(
        f"sbatch --parsable -J m-{tag} -p gpu -N2 --ntasks=2 --ntasks-per-node=1 --gres=gpu:a100:1 -o m-{tag}.out "
        "--wrap='srun bash -c \"echo task=\\$SLURM_PROCID node=\\$SLURMD_NODENAME\"'",
    )
    assert code == 0, err
    assert wait_for_job(ssh, out.strip()) == "COMPLETED"
    _, out, _ = ssh(f"cat m-{tag}.out && rm -f m-{tag}.out")
    nodes = set(re.findall(r"node=(node\d)", out))
    assert len(nodes) == 2, out


def test_the_catalog_entry_matches_what_slurm_reports(ssh: Shell) -> None:
    _, out, _ = ssh("sinfo -h -N -o '%N %P %G %c %m'")
    slurm: dict[tuple[str, str], set[str]] = {}
    for line in out.splitlines():
        node, partition, gres, _cpus, _mem = line.split()
        for gres_type, count in gpu_counts(gres).items():
            slurm.setdefault((partition.rstrip("*"), f"{gres_type}x{count}"), set()).add(node)
    catalog = {
        (g.partition.name, f"{g.gpu_type.gres_type}x{g.gpus_per_node}"): g.node_count
        for g in NodeGroup.objects.filter(partition__cluster__slug="local").select_related("partition", "gpu_type")
    }
    assert {key: len(nodes) for key, nodes in slurm.items()} == catalog


def test_the_example_catalog_local_entry_matches_the_scripts_own(local_cluster: dict[str, Any]) -> None:
    written = yaml.safe_load(Path(local_cluster["catalog"]).read_text())
    example = yaml.safe_load(EXAMPLE_CATALOG.read_text())
    ours = written["clusters"][0]
    theirs = next(c for c in example["clusters"] if c["slug"] == "local")
    assert ours.pop("host_key").startswith("[127.0.0.1]:2222 ssh-ed25519 ")
    assert ours == theirs
    example_gpus = {g["name"]: g for g in example["gpu_types"]}
    for gpu in written["gpu_types"]:
        assert example_gpus[gpu["name"]] == gpu
