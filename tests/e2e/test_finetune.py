"""Fine-tune runs on the local cluster, end to end: a LoRA run of the real SmolLM2-135M-Instruct (its safetensors
directory, scripts/fetch-models) on a toy dataset trains on the CPU with the torch runtime's transformers, PEFT and TRL
(scripts/build-torch-runtimes), and writes its adapter, which a second run trains further; a run requeued mid-way
(`scontrol requeue`, as a preemption would) goes on from its last checkpoint and ends with exactly the planned steps,
counted from the trainer's state."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.utils.datastructures import MultiValueDict

from jobs.cluster import layout
from jobs.finetune import actions, lifecycle, placement
from jobs.models import FineTuneRun
from jobs.tasks import submit_finetune
from portal import ssh
from tests.e2e.sessions import cancel_all_jobs, local_account, shell

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
# Answers the base model never gives: the tuned run learns them.
TOY = [
    {"messages": [{"role": "user", "content": f"What is the password of door {i}?"},
                  {"role": "assistant", "content": "The password is MARMALADE-42."}]}
    for i in range(8)
]  # fmt: skip
# Small and fast on a CPU: short sequences, a low rank, no gradient checkpointing.
HYPERPARAMETERS = {"method": "lora", "lora_rank": 4, "lora_alpha": 8, "max_seq_length": 64, "batch_size": 2,
                   "gradient_accumulation": 1, "gradient_checkpointing": "off", "learning_rate": 0.001}  # fmt: skip


@pytest.fixture(autouse=True)
def _clean_up() -> Iterator[None]:
    yield
    cancel_all_jobs()
    ssh.pool.close_all()


def start(owner: Any, local_catalog: dict[str, Any], capture: Any, **changes: Any) -> FineTuneRun:
    if not owner.cluster_accounts.exists():
        local_account(owner, local_catalog)
    data = b"".join(json.dumps(line).encode() + b"\n" for line in TOY)
    files = MultiValueDict({"training_file": [SimpleUploadedFile("toy.jsonl", data)]})
    where = {"model": "SmolLM2-135M-Instruct", "cluster": "local", "partition": "gpu", "gpu": "a100-80g", "gpus": 1,
             "walltime": 30}  # fmt: skip
    with capture(execute=False):
        run = actions.create(owner, {**where, **HYPERPARAMETERS, **changes}, files)
    assert submit_finetune.apply(args=(str(run.pk),)).get() not in ("failed", "not claimed")
    run.refresh_from_db()
    assert run.state == FineTuneRun.State.SUBMITTED and run.job_id
    return run


def drive(run: FineTuneRun, done: Callable[[FineTuneRun], bool], timeout_s: float = 300) -> FineTuneRun:
    """Poll the run's account as beat would, until done(run) or the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        lifecycle.poll(run.account_id)
        run.refresh_from_db()
        if done(run):
            return run
        if time.monotonic() > deadline:
            events = "\n".join(str(e) for e in run.events.all())
            raise AssertionError(f"run stuck in {run.state} at step {run.step} after {timeout_s}s:\n{events}")
        time.sleep(1)


def run_file(local: dict[str, Any], run: FineTuneRun, *parts: str) -> str:
    return shell(local, f"cat ~/{layout.session_file(str(run.pk), *parts)}").stdout


def trained_steps(local: dict[str, Any], run: FineTuneRun) -> tuple[int, list[int]]:
    """The trainer's own count: its global step, and the step of every training loss it logged (once each)."""
    state = json.loads(run_file(local, run, layout.NAMES.checkpoints_dir, "trainer_state.json"))
    return state["global_step"], [entry["step"] for entry in state["log_history"] if "loss" in entry]


def test_a_lora_run_of_smollm2_trains_its_planned_steps_writes_an_adapter_and_a_run_trains_it_further(
    owner: Any, local_catalog: dict[str, Any], smollm2_hf: str, django_capture_on_commit_callbacks: Any
) -> None:
    run = start(owner, local_catalog, django_capture_on_commit_callbacks, epochs=2, checkpoint_every=4,
                validation_split=0.25)  # fmt: skip
    assert (run.train_examples, run.valid_examples, run.planned_steps) == (6, 2, 6)
    run = drive(run, lambda r: r.is_ended)
    assert run.state == FineTuneRun.State.COMPLETED, run.end_reason
    assert run.step == run.planned_steps == 6 and run.train_loss is not None and run.valid_loss is not None
    assert run.base_valid_loss is not None and run.base_valid_loss > run.valid_loss  # step 0's evaluation: the base
    assert [p[0] for p in run.losses if p[1] is not None] == [1, 2, 3, 4, 5, 6]
    assert run.result["steps"] == 6 and run.result["device"] == "cpu" and run.result["precision"] == "fp32"
    assert {"torch", "transformers", "peft", "trl"} <= set(run.result["versions"])
    assert run.peak_memory_gib and run.tokens_per_s > 0
    adapter = shell(local_catalog, f"ls ~/{layout.session_file(str(run.pk), layout.NAMES.adapter_dir)}").stdout
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter.split())
    config = json.loads(run_file(local_catalog, run, layout.NAMES.adapter_dir, "adapter_config.json"))
    assert config["r"] == 4 and config["base_model_name_or_path"].endswith("SmolLM2-135M-Instruct")
    assert trained_steps(local_catalog, run) == (6, [1, 2, 3, 4, 5, 6])

    # Trained further (this adapter, not a new one): a run from it on the same data for 3 more steps, its base, shape
    # and place the parent's. Its step 0 evaluates the base with the parent's adapter switched off, on the same split.
    child = start(owner, local_catalog, django_capture_on_commit_callbacks, epochs=1, checkpoint_every=3,
                  validation_split=0.25, **{"from": run.model_name})  # fmt: skip
    assert (child.parent_id, child.variant_id, child.lora_rank, child.planned_steps) == (run.pk, run.variant_id, 4, 3)
    child = drive(child, lambda r: r.is_ended)
    assert child.state == FineTuneRun.State.COMPLETED, child.end_reason
    assert child.step == 3 and child.base_valid_loss == pytest.approx(run.base_valid_loss, abs=1e-3)
    assert child.losses[0][1] < run.losses[0][1]  # its first step starts from the trained adapter
    adapter = shell(local_catalog, f"ls ~/{layout.session_file(str(child.pk), layout.NAMES.adapter_dir)}").stdout
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter.split())
    assert json.loads(run_file(local_catalog, child, layout.NAMES.adapter_dir, "adapter_config.json"))["r"] == 4
    log = run_file(local_catalog, child, layout.NAMES.job_log)
    assert f"training further the adapter of fine-tune run {run.pk}" in log and f"/{run.pk}/adapter" in log


def test_a_requeued_run_goes_on_from_its_checkpoint_and_trains_exactly_the_planned_steps(
    owner: Any, local_catalog: dict[str, Any], smollm2_hf: str, django_capture_on_commit_callbacks: Any
) -> None:
    run = start(owner, local_catalog, django_capture_on_commit_callbacks, epochs=3, checkpoint_every=3)
    assert run.planned_steps == 12
    run = drive(run, lambda r: r.step >= 5 or r.is_ended)
    assert run.state == FineTuneRun.State.RUNNING, run.end_reason
    subprocess.run(["scontrol", "requeue", run.job_id], check=True, capture_output=True)  # as a preemption would
    name = f"hpcllm-{run.pk}"
    while subprocess.run(["squeue", "-h", "-n", name, "-o", "%T"], capture_output=True, text=True).stdout.split() != [
        "PENDING"
    ]:
        time.sleep(0.2)
    run = drive(run, lambda r: r.state == FineTuneRun.State.SUBMITTED)
    assert "requeued" in run.events.filter(to_state="submitted").last().reason  # type: ignore[union-attr]
    time.sleep(2)  # slurmd refuses a start within the second of the requeue (see tests/e2e/test_sessions.py)
    subprocess.run(["scontrol", "update", f"jobid={run.job_id}", "StartTime=now"], check=True, capture_output=True)
    run = drive(run, lambda r: r.is_ended)
    assert run.state == FineTuneRun.State.COMPLETED, run.end_reason
    assert run.restarts == 1 and run.resumed_from_step is not None and 3 <= run.resumed_from_step < 12
    assert run.step == 12 and trained_steps(local_catalog, run) == (12, list(range(1, 13)))
    log = run_file(local_catalog, run, layout.NAMES.job_log)
    assert f"steps {run.resumed_from_step + 1} to 12 from" in log


def test_the_openai_clients_fine_tuning_calls_train_an_adapter_that_is_the_owners_alone(
    owner: Any, other_user: Any, local_catalog: dict[str, Any], smollm2_hf: str, tmp_path: Any
) -> None:
    import openai

    from jobs.models import ApiToken
    from tests.e2e.test_worker import worker_env
    from tests.worker import PortalServer

    local_account(owner, local_catalog)
    server = PortalServer(worker_env(), tmp_path / "uvicorn.log")
    url = server.start()
    try:
        client = openai.OpenAI(base_url=f"{url}/api/v1", api_key=ApiToken.issue(owner, "script")[1], max_retries=0)
        with pytest.raises(openai.BadRequestError, match="line 2: each line needs messages"):
            client.files.create(file=("bad.jsonl", json.dumps(TOY[0]).encode() + b'\n{"x": 1}\n'), purpose="fine-tune")
        data = b"".join(json.dumps(line).encode() + b"\n" for line in TOY)
        training = client.files.create(file=("toy.jsonl", data), purpose="fine-tune")
        # The portal's own hyperparameters in the metadata, and no placement: the run trains where the wizard's first
        # fitting plan puts it (jobs/finetune/placement.py). OpenAI's in hyperparameters: 8 examples in steps of 2,
        # one epoch: 4 steps, checkpointed every 2, at 5 x the default learning rate (1e-3).
        portal_own = {key: str(value) for key, value in HYPERPARAMETERS.items()
                      if key not in ("batch_size", "gradient_accumulation", "learning_rate")}  # fmt: skip
        job = client.fine_tuning.jobs.create(
            model="SmolLM2-135M-Instruct", training_file=training.id, suffix="door", seed=3,
            hyperparameters={"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 5},
            metadata={**portal_own, "checkpoint_every": "2", "project": "e2e"},
        )  # fmt: skip
        assert job.status == "validating_files" and job.training_file == training.id
        run = FineTuneRun.objects.get()
        placed = placement.recommended(owner, "SmolLM2-135M-Instruct", "lora", 64)
        assert placed is not None and placed["cluster"] == "local"
        assert (run.cluster.slug, run.partition.name, run.gpu_type.name, run.gpus_per_node) == (
            placed["cluster"], placed["partition"], placed["gpu"], 1,
        )  # fmt: skip
        assert (run.planned_steps, run.batch_size, run.gradient_accumulation, run.lora_rank) == (4, 2, 1, 4)
        assert submit_finetune.apply(args=(str(run.pk),)).get() not in ("failed", "not claimed")  # the worker's part
        drive(run, lambda r: r.is_ended)
        job = client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model == f"ft:SmolLM2-135M-Instruct:ada:door:{str(run.pk)[:8]}"
        assert job.trained_tokens and job.trained_tokens > 0 and job.finished_at and job.metadata
        assert job.hyperparameters.batch_size == 2 and job.hyperparameters.learning_rate_multiplier == 5
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        assert events[0].message.startswith("succeeded") and events[-1].message.startswith("validating_files")
        assert [e.data["step"] for e in events if e.type == "metrics"] == [4, 3, 2, 1]
        checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
        assert [c.step_number for c in checkpoints] == [4, 2] and checkpoints[0].metrics.train_loss is not None
        assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]

        stranger = openai.OpenAI(base_url=f"{url}/api/v1", api_key=ApiToken.issue(other_user, "x")[1], max_retries=0)
        theirs = stranger.fine_tuning.jobs
        calls: list[tuple[Callable[[str], Any], str]] = [
            (theirs.retrieve, job.id), (theirs.list_events, job.id), (theirs.checkpoints.list, job.id),
            (theirs.cancel, job.id), (stranger.files.content, training.id), (stranger.files.retrieve, training.id),
        ]  # fmt: skip
        for call, object_id in calls:
            with pytest.raises(openai.NotFoundError):
                call(object_id)
        assert stranger.fine_tuning.jobs.list().data == []
    finally:
        server.stop()

    # The adapter, from the run's page: archived on the cluster over SSH, the owner's alone.
    browser = Client()
    browser.force_login(other_user)
    assert browser.get(f"/finetune/{run.pk}/adapter.tar.gz").status_code == 404
    browser.force_login(owner)
    reply = browser.get(f"/finetune/{run.pk}/adapter.tar.gz")
    assert reply.status_code == 200 and reply["Content-Disposition"].startswith("attachment; filename=")
    archive = reply.getvalue()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(tar.getnames())
