"""Slurm's text: the one library both apps read Slurm's output with and build its commands by. Plain Python: it knows
Slurm's formats and nothing of Django or SSH. One module a format:

    cli.py        SlurmCli: which binaries, which --clusters; the `CLUSTER: NAME` lines that flag brings
    hostlist.py   node[1-3,7],gpu[01-02] -> the host names
    times.py      times (2026-11-21T12:29:07) and durations ([D-]HH:MM:SS, MM:SS, UNLIMITED)
    records.py    scontrol's one-line Key=Value records: jobs (and jobcomp/filetxt), partitions, nodes
    gres.py       GRES strings (gpu:a100:2(S:0-1),shard:8) and MIG profiles (3g.40gb)
    jobstates.py  job states by what they mean: waiting, active, finished
    squeue.py     squeue's rows in the portal's format, and the pending jobs' demand per partition
    sacct.py      sacct's rows of jobs squeue no longer lists, read as scontrol's records
    sinfo.py      sinfo's rows per node and partition: state, features, GRES configured and used
    sbatch.py     what sbatch prints: --parsable's job id, --test-only's estimate, its errors

Parsers never guess: what they cannot read raises errors.SlurmParseError, or is skipped and reported (a line of
squeue), so a scheduler hiccup is never mistaken for "the job is gone". Checked against Slurm 22.05 on the local test
cluster (tests/portal/data/slurm/ holds its output, tests/e2e/test_slurm_text.py compares with it live); the forms
are stable across 20.x-24.x.
"""
