"""The portal's own jobs in Slurm (jobs/cluster/slurm.py): their names and the squeue that lists them. The library that
reads Slurm's text is unit-tested in tests/portal/slurm/, and on a real job in tests/e2e/test_slurm_job.py."""

from __future__ import annotations

import uuid

import pytest

from jobs.cluster import slurm
from portal.slurm.cli import SlurmCli

# --- the portal's jobs ------------------------------------------------------------------------------------------


def test_job_names_carry_only_a_session_uuid() -> None:
    session = str(uuid.uuid4())
    assert slurm.job_name(session) == f"hpcllm-{session}"
    for hostile in ("x; rm -rf ~", "$(id)", session + "\n", ""):
        with pytest.raises(ValueError):
            slurm.job_name(hostile)


def test_squeue_command_quotes_its_arguments() -> None:
    command = slurm.squeue_command(job_names=["hpcllm-a", "hpcllm-b"], user="ada")
    assert command == "squeue --noheader --states=all '--format=%i|%j|%T|%r|%S|%N|%M|%L|%P|%D' " + (
        "--name=hpcllm-a,hpcllm-b --user=ada"
    )
    elsewhere = slurm.squeue_command(user="ada", cli=SlurmCli("c2", "/opt/slurm/23.11/bin/"))
    assert elsewhere.startswith("/opt/slurm/23.11/bin/squeue --clusters=c2 ")
