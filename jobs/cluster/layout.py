"""Where a session's files live on a cluster and what each is called: the one definition, for Python and the shell.

A session's directory is `~/.hpc-llm-portal/sessions/<session uuid>` in the cluster account's home (a shared
filesystem: the login host and every node of the job see it). Python builds its paths from here; every shell script
the portal runs there (the job scripts, submit, poll, watch, cancel, batch staging) starts with `prelude()`, one
quoted assignment per name, and spells no name again:

    SESSIONS_DIR="$HOME"/.hpc-llm-portal/sessions   CONNECTION_FILE=connection.json   START_MARK=start ...

Plain Python, no Django.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields

from portal.shellsafe import UUID

PORTAL_DIR = ".hpc-llm-portal"  # in the cluster account's home; 0700
SESSIONS_DIR = f"{PORTAL_DIR}/sessions"
# Adapters of other cluster users' fine-tune runs, copied here for this user's sessions (docs/finetune.md, sharing):
# one directory each, named by the run's uuid, holding what the run's directory holds of it (ADAPTER_DIR, the GGUF).
ADAPTERS_DIR = f"{PORTAL_DIR}/adapters"


@dataclass(frozen=True)
class Names:
    """The files of a session directory and of its batch runs' folders. The shell knows each as the field's name in
    capitals ($CONNECTION_FILE); everything here is a plain file name, safe unquoted in a shell."""

    # What the portal stages with a submit (jobs/cluster/remote.py) and the job reads.
    job_script: str = "job.sh"
    api_key_file: str = "api_key"  # 0600; replaced by the job after a requeue
    # What the job writes, the poll reads (hostile input: docs/security.md).
    job_log: str = "job.log"  # Slurm's --output
    connection_file: str = "connection.json"  # written once the server is healthy; gone once it stops
    staging_file: str = "staging.json"  # the node-local copy of the weights, as it goes
    error_file: str = "error"  # why the job stopped, in its own words
    # The submit's and the cancel's own bookkeeping, under the submit lock.
    job_id_file: str = "job_id"
    cancelled_mark: str = "cancelled"
    submit_lock: str = ".submit.lock"
    upload_file: str = ".upload.tar"
    # A job over several nodes: the RPC key and the workers' and replicas' addresses (<prefix><rank>.addr).
    rpc_key_file: str = "rpc_key"
    rpc_addr_prefix: str = "rpc-"
    replica_addr_prefix: str = "replica-"
    addr_suffix: str = ".addr"
    ollama_modelfile: str = "Modelfile"
    # Batch runs: one folder each under batch/ (docs/batch.md).
    batch_dir: str = "batch"
    requests_file: str = "requests.jsonl"
    results_file: str = "results.jsonl"
    progress_file: str = "progress.json"
    output_file: str = "output.jsonl"
    concurrency_file: str = "concurrency"
    start_mark: str = "start"  # the run's files are all there: the job may start its runner
    stop_mark: str = "stop"  # asked to stop: the job stops the runner, what is done is kept
    run_error_file: str = "error"  # why the job gave the run up
    # Fine-tune runs (docs/finetune.md): a run's job has a directory named by the run's uuid, as a session's is (so
    # the same submit, poll, cancel and log commands serve it), holding the checked data and the run's settings that
    # the portal stages, and what the trainer writes: its progress, checkpoints and, at the end, the adapter.
    train_file: str = "train.jsonl"
    valid_file: str = "valid.jsonl"
    train_config_file: str = "finetune.json"
    train_progress_file: str = "train-progress.json"
    checkpoints_dir: str = "checkpoints"
    adapter_dir: str = "adapter"
    # The adapter as llama.cpp loads it (--lora), converted at the run's end by llama.cpp's own converter.
    adapter_gguf: str = "adapter.gguf"


NAMES = Names()


def session_dir(session_id: str) -> str:
    """The session's directory, relative to the cluster account's home."""
    return f"{SESSIONS_DIR}/{UUID.check(session_id, 'session id')}"


def session_file(session_id: str, *parts: str) -> str:
    """A path in the session's directory, relative to the home (for SFTP, which starts there)."""
    return "/".join([session_dir(session_id), *parts])


def run_dir(session_id: str, run_id: str) -> str:
    return session_file(session_id, NAMES.batch_dir, UUID.check(run_id, "batch run id"))


def in_shell(relative: str) -> str:
    """A path relative to the home as a shell word: "$HOME" expanded there, the rest quoted."""
    return f'"$HOME"/{shlex.quote(relative)}'


def assignments() -> dict[str, str]:
    """Shell variable -> its value as a shell word (already quoted)."""
    values = {
        "PORTAL_DIR": in_shell(PORTAL_DIR),
        "SESSIONS_DIR": in_shell(SESSIONS_DIR),
        "ADAPTERS_DIR": in_shell(ADAPTERS_DIR),
    }
    values.update({field.name.upper(): shlex.quote(getattr(NAMES, field.name)) for field in fields(Names)})
    return values


def prelude() -> str:
    """The layout as shell assignments, for the top of every script the portal runs on a cluster."""
    return "".join(f"{name}={value}\n" for name, value in assignments().items())


def script(body: str) -> str:
    """A script to run on a cluster, after the layout's names."""
    return prelude() + body
