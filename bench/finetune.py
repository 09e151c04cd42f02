"""Training steps per second of a fine-tune run through the portal's job against the same trainer run by hand on the
same node, and the time from submit to the first step. A benchmark, not a test.

    .venv/bin/python bench/finetune.py [--examples 32] [--rounds 2]

Needs the local cluster (scripts/local-cluster up, as root) and SmolLM2-135M-Instruct's safetensors directory
(scripts/fetch-models), with the torch runtime's PEFT and TRL (scripts/build-torch-runtimes). A scratch SQLite
database with the local catalog; each round creates a LoRA run of SmolLM2 on a toy chat dataset (batch 2, one epoch:
examples / 2 steps, sequences of 64 tokens, rank 4, on the CPU) as the page does, submits it as a worker would and
polls it every half second until its first step shows, then as beat does (PORTAL_POLL_INTERVAL_S) until it ends.
Then the by-hand baseline: the same finetune.py with the same settings and data (the run's own finetune.json and
train.jsonl), the same Python, under `srun` on the node the run trained on with the job's CPUs and memory, its
outputs in a directory of its own. Both rates are the trainer's own (train_steps_per_second in trainer_state.json:
its training loop, without loading the model); the two ways alternate over the rounds (after a warm-up run that is
not counted) so that drift on a shared machine falls on both. Printed: steps/s of each and their ratio, the median of
the rounds' (target >= 0.95), and the time from the submit to the first step the portal showed (polled every 0.5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SCRATCH = Path(tempfile.mkdtemp(prefix="hpcllm-bench-finetune-"))
os.environ.update(
    DJANGO_SETTINGS_MODULE="portal.settings",
    PORTAL_VAR_DIR=str(SCRATCH),
    PORTAL_LOG_LEVEL="WARNING",
)
os.environ.pop("DATABASE_URL", None)
os.environ.pop("REDIS_URL", None)

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402
from django.core.files.uploadedfile import SimpleUploadedFile  # noqa: E402
from django.db import transaction  # noqa: E402
from django.utils.datastructures import MultiValueDict  # noqa: E402

from bench.local import CLUSTER_DIR, setup  # noqa: E402
from catalog.add_model import add, inspect  # noqa: E402
from catalog.models import Cluster, ClusterAccount  # noqa: E402
from jobs import tasks  # noqa: E402
from jobs.cluster import layout  # noqa: E402
from jobs.finetune import actions, lifecycle  # noqa: E402
from jobs.models import FineTuneRun  # noqa: E402
from portal import ssh  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
WHERE = {"model": MODEL, "cluster": "local", "partition": "gpu", "gpu": "a100-80g", "gpus": 1, "walltime": 30}
HYPERPARAMETERS = {"method": "lora", "lora_rank": 4, "lora_alpha": 8, "max_seq_length": 64, "batch_size": 2,
                   "gradient_accumulation": 1, "gradient_checkpointing": "off", "learning_rate": 0.001, "epochs": 1,
                   "checkpoint_every": 1000}  # fmt: skip


def toy(examples: int) -> bytes:
    answer = {"role": "assistant", "content": "The password is MARMALADE-42."}
    lines = [{"messages": [{"role": "user", "content": f"What is the password of door {i}?"}, answer]}
             for i in range(examples)]  # fmt: skip
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def run_on(account: ClusterAccount, command: str, timeout_s: float = 900) -> str:
    result = account.run(command, timeout_s=timeout_s)
    if not result.ok:
        raise SystemExit(f"failed on the cluster ({result.exit_code}): {command}\n{result.stderr}")
    return result.stdout


def steps_per_second(account: ClusterAccount, state_file: str) -> float:
    """The trainer's own rate over its training loop, from its trainer_state.json."""
    state = json.loads(run_on(account, f"cat {state_file}"))
    rates = [e["train_steps_per_second"] for e in state["log_history"] if "train_steps_per_second" in e]
    if not rates:
        raise SystemExit(f"{state_file} has no train_steps_per_second")
    return float(rates[-1])


def through_portal(account: ClusterAccount, examples: int) -> tuple[FineTuneRun, float, float]:
    """A run as the page makes it, submitted as a worker would and polled every 0.5 s until its first step shows,
    then as beat polls (PORTAL_POLL_INTERVAL_S: polling faster would take CPU from the job on a small machine): the
    run, the seconds from the submit to the first step shown, and its steps/s."""
    user = User.objects.get(pk=account.user_id or 0)
    files = MultiValueDict({"training_file": [SimpleUploadedFile("toy.jsonl", toy(examples))]})
    with transaction.atomic():
        run = actions.create(user, {**WHERE, **HYPERPARAMETERS}, files)
    submitted = time.monotonic()
    tasks.submit_finetune.apply(args=(str(run.pk),))
    first_step_s = 0.0
    deadline = submitted + 900
    while time.monotonic() < deadline:
        lifecycle.poll(account.pk)
        run.refresh_from_db()
        if not first_step_s and run.step >= 1:
            first_step_s = time.monotonic() - submitted
        if run.is_ended:
            break
        time.sleep(settings.PORTAL_POLL_INTERVAL_S if first_step_s else 0.5)
    if run.state != FineTuneRun.State.COMPLETED:
        raise SystemExit(f"the run did not complete ({run.state}): {run.end_reason}")
    state = f"~/{layout.session_file(str(run.pk), layout.NAMES.checkpoints_dir, 'trainer_state.json')}"
    return run, first_step_s, steps_per_second(account, state)


def by_hand(account: ClusterAccount, run: FineTuneRun, round_: int) -> float:
    """The same trainer, settings, data and Python, under srun on the run's node with the job's CPUs and memory."""
    spec = lifecycle.job_spec(run)
    directory = f"~/{layout.session_dir(str(run.pk))}"
    out = f"{directory}/by-hand-{round_}"
    trainer = " ".join(shlex.quote(part) for part in [spec.binary, "finetune.py", "--model", spec.model_path])
    paths = {"config": layout.NAMES.train_config_file, "train": layout.NAMES.train_file,
             "valid": layout.NAMES.valid_file}  # fmt: skip
    args = " ".join(f"--{name} {shlex.quote(path)}" for name, path in paths.items())
    args += f" --progress {out}/progress.json --checkpoints {out}/checkpoints --adapter {out}/adapter"
    args += f" --error {out}/error"
    srun = (f"srun --job-name hpcllm-bench-by-hand --partition {shlex.quote(spec.partition)} "
            f"--nodelist {shlex.quote(run.node_list)} --nodes 1 --ntasks 1 --cpus-per-task {spec.cpus_per_node} "
            f"--mem {spec.memory_gib}G --time 30 --gres gpu:{shlex.quote(spec.gres_type)}:1")  # fmt: skip
    body = (f"cd {directory} && mkdir -p {out} && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "
            f"TOKENIZERS_PARALLELISM=false {trainer} {args}")  # fmt: skip
    run_on(account, f"{srun} bash -c {shlex.quote(body)} > {directory}/by-hand-{round_}.log 2>&1")
    return steps_per_second(account, f"{out}/checkpoints/trainer_state.json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=32, help="toy examples: the steps are half as many")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not (CLUSTER_DIR / "cluster.json").exists():
        raise SystemExit("the local cluster is not up: scripts/local-cluster up (as root)")
    models = json.loads((CLUSTER_DIR / "cluster.json").read_text())["models"]
    if not Path(models.get("smollm2_hf", "")).is_dir():
        raise SystemExit("SmolLM2-135M-Instruct's safetensors are not here: run scripts/fetch-models")
    account = setup()
    local = Cluster.objects.get(slug="local")
    for key in ("smollm2", "smollm2_hf"):  # the card from its GGUF, then the safetensors the trainer reads
        add(inspect(models[key]), models[key], local)
    portal: list[float] = []
    hand: list[float] = []
    first_steps: list[float] = []
    last: FineTuneRun | None = None
    try:
        # A warm-up, not counted: the first training on a cold machine runs at about 0.6 of the later ones (the
        # runtime's files and the model coming into the page cache), whichever way comes first.
        last, _, _ = through_portal(account, args.examples)
        for round_ in range(args.rounds):
            # By hand first in odd rounds (on the files of the run before), after the portal's run in even ones.
            baseline = by_hand(account, last, round_) if last is not None and round_ % 2 else None
            last, first_step_s, rate = through_portal(account, args.examples)
            if baseline is None:
                baseline = by_hand(account, last, round_)
            portal.append(rate)
            hand.append(baseline)
            first_steps.append(first_step_s)
            print(
                f"round {round_ + 1}: portal {rate:.3f} steps/s, by hand {baseline:.3f} steps/s (ratio "
                f"{rate / baseline:.2f}), first step "
                f"{first_step_s:.1f} s after the submit ({last.planned_steps} steps on {last.node_list})"
            )
    finally:
        ssh.pool.close_all()
    # The median of the rounds' ratios: one round that another tenant of a shared machine slowed stays one round.
    ratio = statistics.median(p / h for p, h in zip(portal, hand, strict=True))
    print(
        f"steps/s: portal {statistics.mean(portal):.3f}, by hand {statistics.mean(hand):.3f} (means); "
        f"ratio {ratio:.3f}, the median of the rounds' (target >= 0.95)"
    )
    print(f"submit to first step: {statistics.median(first_steps):.1f} s (median of {len(first_steps)})")


if __name__ == "__main__":
    main()
