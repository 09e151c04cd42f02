"""How Slurm's commands are called on a login host (catalog/slurm_cli.py): a cluster's binaries folder and Slurm
cluster name reach every command, quoted, and the parsers skip the `CLUSTER:` lines --clusters brings."""

from __future__ import annotations

import shlex
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from catalog import inventory
from catalog.slurm_cli import PLAIN, PROGRAMS, SlurmCli, is_cluster_header
from jobs.cluster import slurm
from jobs.models import GroupSource
from jobs.sessions.groups import lookup_command


def test_a_plain_cluster_calls_slurm_as_before() -> None:
    assert PLAIN.command("sinfo", "-h", "-o", "%P") == "sinfo -h -o %P"
    assert inventory.command() == "scontrol show partition -o && echo @@nodes && scontrol show node -o"


def test_every_command_but_sacctmgr_gets_the_binaries_folder_and_the_cluster_name() -> None:
    cli = SlurmCli("c2", "/opt/slurm/23.11/bin/")
    for program in PROGRAMS:
        words = cli.argv(program, "x")
        assert words[0] == f"/opt/slurm/23.11/bin/{program}" and words[-1] == "x"
        assert ("--clusters=c2" in words) == (program != "sacctmgr")
    assert inventory.command(cli) == (
        "/opt/slurm/23.11/bin/scontrol --clusters=c2 show partition -o && echo @@nodes && "
        "/opt/slurm/23.11/bin/scontrol --clusters=c2 show node -o"
    )
    assert slurm.squeue_command(user="ada", cli=cli).startswith("/opt/slurm/23.11/bin/squeue --clusters=c2 ")


def test_sacctmgr_names_the_cluster_in_its_query() -> None:
    command = lookup_command(GroupSource.Kind.SLURM_ACCOUNT, "lab", SlurmCli("c2", "/opt/slurm/bin"))
    assert (
        command == "/opt/slurm/bin/sacctmgr --noheader --parsable2 show associations account=lab cluster=c2 format=User"
    )
    assert "cluster=" not in lookup_command(GroupSource.Kind.SLURM_ACCOUNT, "lab")


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


def test_the_cluster_line_of_squeue_and_sinfo_is_skipped_not_reported() -> None:
    assert is_cluster_header("CLUSTER: c2") and not is_cluster_header("CLUSTER: two words")
    text = "CLUSTER: c2\n101|hpcllm-x|RUNNING|None|2026-11-21T12:00:00|node1|1:00|59:00|gpu|1\n"
    jobs, bad = slurm.parse_squeue(text)
    assert [job.job_id for job in jobs] == ["101"] and bad == []
    nodes, bad = slurm.parse_sinfo_gres("CLUSTER: c2\nnode1|gpu*|idle|a100|gpu:a100:2|gpu:a100:0\n")
    assert [node.node for node in nodes] == ["node1"] and bad == []
    assert slurm.parse_sbatch_parsable("4242;c2\n") == "4242"
