"""How Slurm's commands are called on a login host (portal/slurm/cli.py): a cluster's binaries folder and Slurm
cluster name reach every command, quoted, and the `CLUSTER:` lines --clusters brings are known for what they are."""

from __future__ import annotations

import shlex
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal.slurm.cli import PLAIN, PROGRAMS, SlurmCli, is_cluster_header


def test_a_plain_cluster_calls_slurm_as_before() -> None:
    assert PLAIN.command("sinfo", "-h", "-o", "%P") == "sinfo -h -o %P"
    assert PLAIN.cluster_filter() == []


def test_every_command_but_sacctmgr_gets_the_binaries_folder_and_the_cluster_name() -> None:
    cli = SlurmCli("c2", "/opt/slurm/23.11/bin/")
    for program in PROGRAMS:
        words = cli.argv(program, "x")
        assert words[0] == f"/opt/slurm/23.11/bin/{program}" and words[-1] == "x"
        assert ("--clusters=c2" in words) == (program != "sacctmgr")
    assert cli.cluster_filter() == ["cluster=c2"]  # sacctmgr's way


@pytest.mark.parametrize(
    ("cluster", "bin_dir"),
    [("two words", ""), ("c1;rm", ""), ("-M", ""), ("", "relative/bin"), ("", "/opt/slurm bin"), ("", "/opt/$(x)")],
)
def test_values_that_could_reach_the_shell_unquoted_are_refused(cluster: str, bin_dir: str) -> None:
    with pytest.raises(ValueError, match="not a"):
        SlurmCli(cluster, bin_dir)


def test_only_slurms_own_commands_are_built() -> None:
    with pytest.raises(ValueError, match="not a Slurm command"):
        PLAIN.argv("rm", "-rf", "/")


@given(st.text(max_size=40), st.text(max_size=40))
def test_any_accepted_value_comes_back_as_one_shell_word(cluster: str, bin_dir: str) -> None:
    try:
        cli = SlurmCli(cluster, "/" + bin_dir)
    except ValueError:
        return
    assert shlex.split(cli.command("squeue", "-h")) == cli.argv("squeue", "-h")


def test_a_scripts_bare_slurm_commands_become_the_clusters() -> None:
    # "command squeue" skips the function: the real squeue (here a fake on PATH) gets the flag once.
    script = SlurmCli("c2").script("squeue -h -o %i")
    fake = "mkdir -p $T && printf '#!/bin/sh\\necho squeue \"$*\"\\n' >$T/squeue && chmod +x $T/squeue && "
    out = subprocess.run(
        ["bash", "-c", f"T=$(mktemp -d); {fake} PATH=$T:$PATH bash -c {shlex.quote(script)}"],
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "squeue --clusters=c2 -h -o %i", out.stderr
    with_dir = SlurmCli("", "/opt/slurm/bin").script("sbatch --parsable job.sh")
    assert with_dir.startswith('export PATH=/opt/slurm/bin:"$PATH"\n')  # the job's srun finds the same install
    assert 'sbatch() { /opt/slurm/bin/sbatch "$@"; }' in with_dir
    assert PLAIN.script("squeue -h") == "squeue -h"


def test_the_cluster_line_of_squeue_and_sinfo_is_known() -> None:
    assert is_cluster_header("CLUSTER: c2") and not is_cluster_header("CLUSTER: two words")
    assert not is_cluster_header("101|hpcllm-x|RUNNING")
