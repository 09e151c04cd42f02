"""Render a session's sbatch script from the per-runtime templates in jobs/cluster/scripts/. Plain Python, no Django.

A rendered script is: #SBATCH lines (allow-listed values only, since sbatch reads them itself), the cluster-side
layout's names (jobs/cluster/layout.py) and one shell-quoted assignment per value, then the static job side: one
file per concern (JOB_PARTS: the skeleton, the server, the key proxy, staging, batch runs), which only define
functions, and <runtime>.sh, which calls them. They only ever use "$VARIABLES": no value is pasted into template
text, so nothing a user or admin types can become shell syntax.
"""

from __future__ import annotations

import re
import shlex
import uuid
from dataclasses import dataclass
from pathlib import Path

from catalog.runtime_rules import RUNTIMES, RuntimeRules
from catalog.toolcalls import VLLM_PARSERS
from jobs.cluster import layout
from jobs.cluster.slurm import JOB_NAME_PREFIX, job_name
from portal import shellsafe

SCRIPTS_DIR = Path(__file__).resolve().parent / "scripts"
# The job side by concern, in the order a job script defines them; each only defines functions (but the skeleton,
# which sets the job up), so a test can source any of them after the skeleton.
JOB_PARTS = ("skeleton.sh", "server.sh", "keyproxy.sh", "staging.sh", "batch.sh")
# What a job that works through batch runs needs beside its script (docs/batch.md).
BATCH_FILES = ("batchrun.py", "supervisor.py")
# A fine-tune run's job (docs/finetune.md): the skeleton, then the trainer's part, which runs finetune.py beside it.
TRAINER_PARTS = ("skeleton.sh", "finetune.sh")
TRAINER_FILES = ("finetune.py",)


class RenderError(ValueError):
    """A value cannot go into a job script (it should have been stopped by validation earlier)."""


@dataclass(frozen=True)
class JobSpec:
    session_id: str
    runtime: str
    partition: str
    account: str
    nodes: int
    gpus_per_node: int
    gres_type: str
    constraint: str
    cpus_per_node: int
    memory_gib: int
    walltime_min: int
    binary: str
    served_name: str
    context_length: int
    parallel: int
    embeddings: bool = False  # serve /v1/embeddings instead of generating
    # vLLM's --tool-call-parser for the model (its card's); "": vLLM sessions start without tool calling.
    tool_call_parser: str = ""
    # A batch launch: the job works through this run's requests (batchrun.py) once the server is ready, then ends.
    batch_run: str = ""
    batch_concurrency: int = 1
    replicas: int = 1  # a batch launch's servers, one per node, sharing the prompts
    model_path: str = ""
    ollama_tag: str = ""
    model_dir: str = ""
    rpc_binary: str = ""
    modules: tuple[str, ...] = ()
    default_flags: tuple[str, ...] = ()
    extra_flags: tuple[str, ...] = ()
    # Copy the model's files to node-local storage first (staging.sh stage_model); "": load them where they are.
    stage_to: str = ""
    stage_keep: bool = True  # keep the copy for the next session on the node
    gpu_layers: int = 999
    gpu_memory_utilization: float = 0.90
    ready_timeout_s: int = 1800
    # A fine-tune run's job: the trainer (TRAINER_PARTS) on the runtime's Python ($SERVER_BIN) instead of a server,
    # warned this many seconds before its time limit (--signal=B:USR1@N) to save a checkpoint, and requeued then.
    trainer: bool = False
    signal_s: int = 0
    # LoRA adapters the server loads (docs/finetune.md, serving): the fine-tune runs' uuids, whose directories beside
    # this one hold them (llama.cpp: the GGUF the run converted; vLLM: the PEFT directory, its module named by the
    # uuid), in this order (llama-server's adapter ids); vLLM's --max-lora-rank, at least the largest rank.
    adapters: tuple[str, ...] = ()
    max_lora_rank: int = 0
    # Those of the adapters copied into this cluster user's home ($ADAPTERS_DIR/<uuid>: another cluster user's runs
    # shared with the session's owner, jobs/sessions/adapter_copies.py) rather than beside this session's directory.
    copied_adapters: tuple[str, ...] = ()
    # A fine-tune run: llama.cpp's convert_lora_to_gguf.py, run at the end with the trainer's Python ("": no GGUF).
    lora_converter: str = ""
    # A fine-tune run that trains another run's adapter further: that run's uuid, whose directory beside this one
    # holds the adapter the trainer starts from ("": a new adapter).
    parent_run: str = ""


def _check(allowed: shellsafe.AllowList, value: str, what: str) -> str:
    if not allowed.accepts(value):
        raise RenderError(f"{what} {value!r} cannot go into an #SBATCH line")
    return value


def _positive(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RenderError(f"{what} must be a positive integer, not {value!r}")
    return value


def sbatch_directives(spec: JobSpec) -> list[str]:
    session_id = _check(shellsafe.UUID, spec.session_id, "session id")
    lines = [
        f"--job-name={job_name(session_id)}",
        f"--partition={_check(shellsafe.SLURM_NAME, spec.partition, 'partition')}",
    ]
    if spec.account:
        lines.append(f"--account={_check(shellsafe.SLURM_ACCOUNT, spec.account, 'account')}")
    lines += [
        f"--nodes={_positive(spec.nodes, 'nodes') * _positive(spec.replicas, 'replicas')}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={_positive(spec.cpus_per_node, 'CPUs per node')}",
        f"--mem={_positive(spec.memory_gib, 'memory')}G",
        "--gres=gpu:"
        f"{_check(shellsafe.SLURM_NAME, spec.gres_type, 'GPU type')}:{_positive(spec.gpus_per_node, 'GPUs')}",
    ]
    if spec.constraint:
        lines.append(f"--constraint={_check(shellsafe.SLURM_NAME, spec.constraint, 'constraint')}")
    lines += [
        f"--time={_positive(spec.walltime_min, 'walltime')}",
        f"--output={layout.NAMES.job_log}",
        "--open-mode=append",
    ]
    if spec.signal_s:
        lines.append(f"--signal=B:USR1@{_positive(spec.signal_s, 'signal lead')}")
    if spec.trainer:
        lines.append("--requeue")  # where a site's JobRequeue=0 would not let a preempted run, or the job, requeue
    if _rules(spec.runtime).exclusive_on(spec.nodes):
        lines.append("--exclusive=user")
    return [f"#SBATCH {line}" for line in lines]


def _array(values: tuple[str, ...]) -> str:
    return "(" + " ".join(shlex.quote(v) for v in values) + ")"


def assignments(spec: JobSpec) -> list[str]:
    scalars: dict[str, str | int] = {
        "SESSION_ID": spec.session_id,
        "RUNTIME": spec.runtime,
        "SERVER_BIN": spec.binary,
        "RPC_BIN": spec.rpc_binary,
        "MODEL_PATH": spec.model_path,
        "OLLAMA_TAG": spec.ollama_tag,
        "MODEL_DIR": spec.model_dir,
        "SERVED_NAME": spec.served_name,
        "NODES": _positive(spec.nodes, "nodes"),
        "GPUS_PER_NODE": _positive(spec.gpus_per_node, "GPUs"),
        "CONTEXT": _positive(spec.context_length, "context length"),
        "PARALLEL": _positive(spec.parallel, "parallel slots"),
        "EMBEDDINGS": int(spec.embeddings),
        "TOOL_CALL_PARSER": _parser(spec.tool_call_parser),
        "BATCH_RUN": _check(shellsafe.UUID, spec.batch_run, "batch run id") if spec.batch_run else "",
        "BATCH_CONCURRENCY": _positive(spec.batch_concurrency, "batch concurrency"),
        "REPLICAS": _positive(spec.replicas, "replicas"),
        "GPU_LAYERS": _positive(spec.gpu_layers, "GPU layers"),
        "GPU_MEMORY_UTILIZATION": f"{spec.gpu_memory_utilization:.2f}",
        "READY_TIMEOUT_S": _positive(spec.ready_timeout_s, "ready timeout"),
        "STAGE_TO": _check(shellsafe.STAGE_TARGET, spec.stage_to, "staging directory") if spec.stage_to else "",
        "STAGE_KEEP": int(spec.stage_keep),
        "MAX_LORA_RANK": spec.max_lora_rank if spec.adapters else 0,
        "LORA_CONVERTER": _converter(spec.lora_converter),
        "PARENT_RUN": _check(shellsafe.UUID, spec.parent_run, "parent run id") if spec.parent_run else "",
    }
    lines = [f"{name}={shlex.quote(str(value))}" for name, value in scalars.items()]
    lines += [
        f"MODULES={_array(spec.modules)}",
        f"DEFAULT_FLAGS={_array(spec.default_flags)}",
        f"EXTRA_FLAGS={_array(spec.extra_flags)}",
        f"ADAPTER_RUNS={_array(tuple(_check(shellsafe.UUID, run, 'adapter run id') for run in spec.adapters))}",
        f"COPIED_ADAPTERS={_array(tuple(_copied(run, spec.adapters) for run in spec.copied_adapters))}",
    ]
    for line in lines:
        if "\n" in line or "\x00" in line:
            raise RenderError("values must not contain newlines or NUL bytes")
    return lines


def _copied(run: str, adapters: tuple[str, ...]) -> str:
    if run not in adapters:
        raise RenderError(f"copied adapter {run!r} is not one of the session's adapters")
    return _check(shellsafe.UUID, run, "adapter run id")


def _converter(path: str) -> str:
    if path and not (shellsafe.ABSOLUTE_PATH.accepts(path) and path.endswith(".py")):
        raise RenderError(f"{path!r} is not the absolute path of llama.cpp's LoRA converter")
    return path


def lora_converter(llama_server: str) -> str:
    """Where llama.cpp's LoRA converter is installed beside a llama-server binary: scripts/build-llama-cpp puts the
    converter of the same sources in <prefix>/convert/ beside <prefix>/bin/ ("" for a binary found on the PATH)."""
    if not llama_server.startswith("/"):
        return ""
    return str(Path(llama_server).parent.parent / "convert" / "convert_lora_to_gguf.py")


def _parser(name: str) -> str:
    """Only a name vLLM registers: an unknown one would stop vLLM at startup (the card's validation says so first)."""
    if name and name not in VLLM_PARSERS:
        raise RenderError(f"{name!r} is not one of vLLM's tool-call parsers")
    return name


def _rules(runtime: str) -> RuntimeRules:
    rules = RUNTIMES.get(runtime)
    if rules is None or not rules.launchable:
        raise RenderError(f"unknown runtime {runtime!r}")
    return rules


def render(spec: JobSpec) -> str:
    rules = _rules(spec.runtime)
    if spec.nodes > 1 and not rules.multi_node:
        raise RenderError(rules.one_node_only())
    if spec.replicas > 1 and not (spec.batch_run and spec.nodes == 1):
        raise RenderError("replicas are for batch launches of one node each")
    if spec.embeddings and not rules.serves_embeddings:
        raise RenderError(f"{rules.label} cannot serve embeddings")
    if spec.nodes > 1 and rules.rpc_binary and not spec.rpc_binary:
        raise RenderError(f"a {spec.runtime} session over several nodes needs the cluster's ggml-rpc-server binary")
    if spec.trainer and (spec.nodes > 1 or spec.replicas > 1 or spec.batch_run):
        raise RenderError("a fine-tune run trains on one node, with no batch run")
    what = "fine-tune run" if spec.trainer else "session"
    header = [
        "#!/bin/bash",
        *sbatch_directives(spec),
        f"# Rendered by HPC LLM Portal for {what} {spec.session_id}; templates: jobs/cluster/scripts/.",
        "# Every value below is validated and shell-quoted; the code after it only reads these variables.",
        layout.prelude().rstrip("\n"),
        *assignments(spec),
        "",
    ]
    return "\n".join(header) + (trainer_body() if spec.trainer else body(spec.runtime))


def body(runtime: str) -> str:
    """The static part of a runtime's job script: the job side's parts, then the runtime's own script."""
    return "".join((SCRIPTS_DIR / name).read_text() for name in (*JOB_PARTS, _rules(runtime).job_script))


def trainer_body() -> str:
    """The static part of a fine-tune run's job script."""
    return "".join((SCRIPTS_DIR / name).read_text() for name in TRAINER_PARTS)


# --- what a restricted key's gate accepts as a job script (portal/gate.py) ----------------------------------------

BODY_STARTS = "# ---- skeleton.sh"  # the body's first line: the gate hashes from here
# One word as shlex.quote writes it: plain safe characters, or single quotes with a quote written '"'"'.
_QUOTED = r"(?:[A-Za-z0-9_@%+=:,./-]+|'[^']*(?:'\"'\"'[^']*)*')"
_ARRAYS = ("MODULES", "DEFAULT_FLAGS", "EXTRA_FLAGS", "ADAPTER_RUNS", "COPIED_ADAPTERS")


def header_rules(pinned: dict[str, list[str]]) -> list[str]:
    """The lines a job script's header may have, as regexes: render's #SBATCH lines with the same allow-lists, its
    comments, the layout's assignments and one quoted assignment a line for every value. `pinned`: names whose
    value must be one of these (as render writes them: a quoted word, or an array), such as the cluster's binaries."""
    word = r"[1-9][0-9]{0,8}"
    sbatch = {
        "job-name": re.escape(JOB_NAME_PREFIX) + shellsafe.inner(shellsafe.UUID),
        "partition": shellsafe.inner(shellsafe.SLURM_NAME),
        "account": shellsafe.inner(shellsafe.SLURM_ACCOUNT),
        "nodes": word,
        "ntasks-per-node": "1",
        "cpus-per-task": word,
        "mem": word + "G",
        "gres": f"gpu:{shellsafe.inner(shellsafe.SLURM_NAME)}:{word}",
        "constraint": shellsafe.inner(shellsafe.SLURM_NAME),
        "time": word,
        "output": re.escape(layout.NAMES.job_log),
        "open-mode": "append",
        "exclusive": "user",
        "signal": f"B:USR1@{word}",
    }
    rules = ["^#!/bin/bash\\Z", "^\\Z", "^# [^\\n]*\\Z", "^#SBATCH --requeue\\Z"]
    rules += [f"^#SBATCH --{re.escape(option)}={value}\\Z" for option, value in sbatch.items()]
    rules += [f"^{re.escape(line)}\\Z" for line in layout.prelude().rstrip("\n").split("\n")]
    sample = JobSpec(str(uuid.UUID(int=0)), "llama.cpp", "p", "", 1, 1, "g", "", 1, 1, 1, "b", "n", 1, 1)
    names = [line.split("=", 1)[0] for line in assignments(sample)]  # render's own, in its order
    for name in names:
        if name in pinned:
            rules.append(f"^{name}=(?:{'|'.join(re.escape(value) for value in pinned[name])})\\Z")
        elif name in ("ADAPTER_RUNS", "COPIED_ADAPTERS"):  # uuids alone: the job side makes paths of them
            run = shellsafe.inner(shellsafe.UUID)
            rules.append(f"^{name}=\\((?:{run}(?: {run})*)?\\)\\Z")
        elif name == "PARENT_RUN":  # a uuid or nothing, as ADAPTER_RUNS: the job reads the adapter in this home
            rules.append(f"^{name}=(?:{shellsafe.inner(shellsafe.UUID)}|'')\\Z")
        elif name in _ARRAYS:
            rules.append(f"^{name}=\\((?:{_QUOTED}(?: {_QUOTED})*)?\\)\\Z")
        else:
            rules.append(f"^{name}={_QUOTED}\\Z")
    return rules


def quoted(value: str | tuple[str, ...]) -> str:
    """A value as render writes it into an assignment: a quoted word, or a bash array of quoted words."""
    return _array(value) if isinstance(value, tuple) else shlex.quote(value)


def extra_files(runtime: str, batch: bool = False, trainer: bool = False) -> dict[str, str]:
    """The helpers staged next to the job script in the session directory (the key proxy, the RPC relay, the batch
    runner and its supervisor; a fine-tune run's trainer alone)."""
    names = list(TRAINER_FILES) if trainer else [*_rules(runtime).job_files, *(BATCH_FILES if batch else ())]
    return {name: (SCRIPTS_DIR / name).read_text() for name in names}


def batch_files() -> dict[str, str]:
    """What a running session needs beside its script to take a batch run (staged with the run)."""
    return {name: (SCRIPTS_DIR / name).read_text() for name in BATCH_FILES}
