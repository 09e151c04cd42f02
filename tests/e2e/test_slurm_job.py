"""The library that reads Slurm's text (portal/slurm/) on a real job of the local cluster, over the pinned SSH
connection: sbatch's estimate and reply, squeue's row of the running job, the jobcomp record once it is cancelled,
and sbatch's words when it refuses."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from jobs.cluster import slurm
from portal.slurm.hostlist import expand_hostlist
from portal.slurm.records import parse_job_records
from portal.slurm.sbatch import parse_sbatch_parsable, parse_test_only, sbatch_error
from portal.slurm.squeue import parse_squeue
from portal.ssh import SSHPool, SSHTarget

pytestmark = pytest.mark.e2e


def test_real_outputs_of_the_local_cluster_parse(local_cluster: dict[str, Any]) -> None:
    target = SSHTarget(
        local_cluster["host"],
        local_cluster["port"],
        local_cluster["user"],
        local_cluster["host_key_line"],
        Path(local_cluster["private_key"]).read_text(),
    )
    pool = SSHPool()
    try:
        name = slurm.job_name(str(uuid.uuid4()))
        estimate = parse_test_only(pool.run(target, "sbatch --test-only -p gpu -N2 --wrap=true").stderr)
        assert estimate.partition == "gpu" and len(expand_hostlist(estimate.node_list)) == 2
        submitted = pool.run(target, f"sbatch --parsable -J {name} -p gpu -N2 --ntasks-per-node=1 --wrap='sleep 30'")
        job_id = parse_sbatch_parsable(submitted.stdout)
        try:
            for _ in range(40):
                jobs, bad = parse_squeue(pool.run(target, slurm.squeue_command(job_names=[name])).stdout)
                assert not bad
                if jobs and jobs[0].state == "RUNNING":
                    break
                time.sleep(0.25)
            job = jobs[0]
            assert (job.job_id, job.name, job.state, job.partition, job.node_count) == (
                job_id,
                name,
                "RUNNING",
                "gpu",
                2,
            )
            assert len(job.nodes) == 2 and job.start_time is not None
        finally:
            pool.run(target, f"scancel {job_id}")
        for _ in range(40):
            record = parse_job_records(
                pool.run(target, f"grep 'JobId={job_id} ' {local_cluster['jobcomp_log']}").stdout
            )
            if job_id in record:
                break
            time.sleep(0.25)
        assert record[job_id]["JobState"] == "CANCELLED"
        assert record[job_id]["Name"] == name
        assert expand_hostlist(record[job_id]["NodeList"]) == job.nodes
        failure = pool.run(target, "sbatch -p gpu --gres=gpu:a100:3 --wrap=true")
        assert not failure.ok
        assert sbatch_error(failure.stderr) == "Requested node configuration is not available"
        assert re.search(r"^\d+$", job_id)
    finally:
        pool.close_all()
