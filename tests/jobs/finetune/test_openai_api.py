"""OpenAI's fine-tuning API (jobs/use/openai_finetunes.py) through the ASGI application, as the `openai` client reaches
it: training data uploaded with purpose "fine-tune" and checked line by line, a job made into a fine-tune run through
the run's own form (where it runs from the metadata; tiny-llama's `safetensors` from conftest.py), refusals in
OpenAI's shape, jobs in OpenAI's shape with their events and checkpoints, pages of them, and nothing of anyone's for
anyone else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import openai
import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from catalog.models import ModelVariant
from jobs.finetune import placement
from jobs.models import ApiToken, BatchFile, FineTuneRun, transition_finetune
from tests.asgi import Portal, bearer, run, sdk_client

pytestmark = pytest.mark.django_db(transaction=True)

WHERE = {"cluster": "local", "partition": "gpu", "gpu": "a100-80g", "gpus": "1", "walltime": "30"}
CHAT = b"".join(
    json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}).encode()
    + b"\n"
    for i in range(6)
)


@pytest.fixture(autouse=True)
def _files_in(settings: Any, tmp_path: Path) -> None:
    settings.MEDIA_ROOT = tmp_path / "files"
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path)


def api(user: Any) -> Portal:
    return Portal(bearer(ApiToken.issue(user, "script")[1]))


def upload(portal: Portal, content: bytes = CHAT, purpose: str = "fine-tune") -> Any:
    return portal.post("/api/v1/files", files={"file": ("toy.jsonl", content)}, data={"purpose": purpose})


def create(portal: Portal, **changes: Any) -> Any:
    file_id = changes.pop("training_file", None) or upload(portal).json()["id"]
    body = {"model": "tiny-llama", "training_file": file_id, "metadata": WHERE, **changes}
    return portal.post("/api/v1/fine_tuning/jobs", json=body)


def error_of(reply: Any) -> tuple[int, str]:
    return reply.status_code, reply.json()["error"]["message"]


def test_training_data_is_checked_line_by_line_when_uploaded_and_kept_as_fine_tune(owner: Any) -> None:
    mine = api(owner)
    reply = upload(mine)
    assert reply.status_code == 200, reply.text
    assert (reply.json()["purpose"], reply.json()["bytes"]) == ("fine-tune", len(CHAT))
    bad = upload(mine, CHAT + b'{"messages": [{"role": "user", "content": "q"}]}\n{oops\n')
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_file")
    assert "line 7: the last message must be the assistant's" in bad.json()["error"]["message"]
    assert "line 8" in bad.json()["error"]["message"]
    assert upload(mine, b"x", purpose="fine-tuning").status_code == 400
    assert upload(mine, CHAT, purpose="batch").json()["error"]["code"] == "invalid_file"  # not a batch's lines
    assert [f["purpose"] for f in mine.get("/api/v1/files", params={"purpose": "fine-tune"}).json()["data"]] == [
        "fine-tune"
    ]
    assert BatchFile.objects.count() == 1


def test_a_job_is_a_fine_tune_run_with_openais_hyperparameters_and_the_metadatas_placement(
    owner: Any, safetensors: ModelVariant
) -> None:
    mine = api(owner)
    valid = upload(mine, CHAT[: CHAT.index(b"\n") + 1]).json()["id"]
    hyperparameters = {"n_epochs": 2, "batch_size": 6, "learning_rate_multiplier": 0.5}
    reply = create(mine, validation_file=valid, suffix="toy", seed=7, hyperparameters=hyperparameters,
                   metadata={**WHERE, "lora_rank": "4", "project": "p1"})  # fmt: skip
    assert reply.status_code == 200, reply.text
    job = reply.json()
    found = FineTuneRun.objects.get()
    assert (found.epochs, found.batch_size, found.gradient_accumulation) == (2, 3, 2)  # 6 examples a step
    assert (found.learning_rate, found.lora_rank, found.seed, found.suffix) == (1e-4, 4, 7, "toy")
    assert (found.train_examples, found.valid_examples, found.planned_steps) == (6, 1, 2)
    assert job["id"] == f"ftjob-{found.pk.hex}" and job["object"] == "fine_tuning.job"
    assert (job["status"], job["model"], job["fine_tuned_model"], job["seed"]) == ("validating_files", "tiny-llama",
                                                                                  None, 7)  # fmt: skip
    assert job["hyperparameters"] == hyperparameters
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    assert (job["validation_file"], job["metadata"]["project"], job["result_files"]) == (valid, "p1", [])
    assert mine.get(f"/api/v1/fine_tuning/jobs/{job['id']}").json() == {**job, "estimated_finish": None}

    supervised = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": "auto"}}}
    second = create(mine, method=supervised).json()
    assert second["hyperparameters"] == {"n_epochs": 1, "batch_size": 16, "learning_rate_multiplier": 1.0}


@pytest.mark.parametrize(
    ("changes", "status", "message"),
    [
        ({"hyperparameters": {"n_epochs": 0}}, 400, "n_epochs must be a whole number"),
        ({"hyperparameters": {"lora_rank": 4}}, 400, "unknown lora_rank"),
        ({"hyperparameters": {"n_epochs": 2}, "metadata": {**WHERE, "epochs": "3"}}, 400, "epochs both in"),
        ({"method": {"type": "dpo"}}, 400, "only supervised"),
        ({"model": "ft:tiny-llama:ada::12345678"}, 404, "does not exist or you do not have access to it"),
        ({"model": "tiny-llama:F16"}, 400, "quant: Fine-tuning trains from safetensors"),
        ({"metadata": {**WHERE, "gpus": "2"}}, 400, "gpus: A fine-tune run trains on one GPU"),
        ({"metadata": {**WHERE, "partition": "nowhere"}}, 400, "has no partition 'nowhere'"),
        ({"training_file": "file-0123456789abcdef0123456789abcdef"}, 404, "no file"),
    ],
)
def test_a_job_that_cannot_run_is_refused_in_openais_shape_with_the_reason(
    owner: Any, safetensors: ModelVariant, changes: dict[str, Any], status: int, message: str
) -> None:
    reply = create(api(owner), **changes)
    assert reply.status_code == status and message in reply.json()["error"]["message"], reply.text
    assert not FineTuneRun.objects.exists()


def test_without_a_placement_the_run_trains_where_the_wizards_first_plan_fits(
    owner: Any, safetensors: ModelVariant
) -> None:
    reply = create(api(owner), metadata={"project": "p", "lora_rank": "4"})
    assert reply.status_code == 200, reply.text
    found = FineTuneRun.objects.select_related("cluster", "partition", "gpu_type").get()
    # The wizard's LoRA plan for tiny-llama at the run's sequence length: the one partition here, one of its GPUs.
    plan = placement.recommended(owner, "tiny-llama", "lora", found.max_seq_length)
    assert plan is not None and plan["gpus"] == "1"
    assert (found.cluster.slug, found.partition.name, found.gpu_type.name) == (plan["cluster"], plan["partition"],
                                                                              plan["gpu"])  # fmt: skip
    assert (found.lora_rank, reply.json()["metadata"]["project"]) == (4, "p")


def test_without_a_placement_and_no_plan_that_fits_the_job_is_refused_with_how_to_place_it(
    safetensors: ModelVariant, django_user_model: Any
) -> None:
    nowhere = django_user_model.objects.create_user("newcomer")  # no cluster account yet: no partition to use
    reply = create(api(nowhere), metadata={"project": "p"})
    assert reply.status_code == 400 and "say where it trains in metadata" in reply.json()["error"]["message"]
    assert not FineTuneRun.objects.exists()


def test_a_batch_file_is_no_training_data_and_training_data_no_batch(owner: Any, safetensors: ModelVariant) -> None:
    mine = api(owner)
    line = {"custom_id": "a", "url": "/v1/chat/completions", "body": {"model": "tiny", "messages": [
        {"role": "user", "content": "hi"}]}}  # fmt: skip
    batch_file = upload(mine, json.dumps(line).encode() + b"\n", purpose="batch").json()["id"]
    assert error_of(create(mine, training_file=batch_file)) == (400, f"training_file {batch_file} was uploaded for "
                                                                     "batch, not fine-tune")  # fmt: skip
    training = upload(mine).json()["id"]
    asked = {"input_file_id": training, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    assert mine.post("/api/v1/batches", json=asked).json()["error"]["code"] == "invalid_file"


def test_jobs_are_listed_newest_first_a_page_at_a_time(owner: Any, safetensors: ModelVariant) -> None:
    mine = api(owner)
    made = [create(mine).json()["id"] for _ in range(3)]
    first = mine.get("/api/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == made[:0:-1] and first["has_more"] is True
    rest = mine.get("/api/v1/fine_tuning/jobs", params={"limit": 2, "after": made[1]}).json()
    assert [j["id"] for j in rest["data"]] == made[:1] and rest["has_more"] is False


def progressed(job_id: str) -> FineTuneRun:
    """The run of a job as the poll leaves it after a completed training of 4 steps, checkpointed every 2."""
    pk = job_id.removeprefix("ftjob-")
    FineTuneRun.objects.filter(pk=pk).update(checkpoint_every=2, planned_steps=4)
    transition_finetune(pk, FineTuneRun.State.SUBMITTED, reason="submitted as job 7", job_id="7")
    transition_finetune(pk, FineTuneRun.State.RUNNING, reason="training", started_at=timezone.now())
    losses = [[1, 2.0, None], [2, 1.5, 1.6], [3, 1.2, None], [4, 0.9, 1.0]]
    transition_finetune(pk, FineTuneRun.State.COMPLETED, reason="trained 4 steps", step=4, losses=losses,
                        result={"steps": 4, "tokens": 321}, train_loss=0.9, valid_loss=1.0)  # fmt: skip
    return FineTuneRun.objects.get(pk=pk)


def test_a_finished_jobs_events_and_checkpoints_come_from_its_history_and_loss_curve(
    owner: Any, safetensors: ModelVariant
) -> None:
    mine = api(owner)
    job_id = create(mine, suffix="toy").json()["id"]
    done = progressed(job_id)
    job = mine.get(f"/api/v1/fine_tuning/jobs/{job_id}").json()
    assert (job["status"], job["fine_tuned_model"], job["trained_tokens"]) == ("succeeded", done.model_name, 321)
    assert job["fine_tuned_model"].startswith("ft:tiny-llama:ada:toy:") and job["finished_at"] >= job["created_at"]
    events = mine.get(f"/api/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
    messages = [e["message"] for e in events["data"]]
    assert messages[0] == "succeeded: trained 4 steps" and messages[-1].startswith("validating_files: requested by")
    metrics = [e for e in events["data"] if e["type"] == "metrics"]
    assert [e["data"]["step"] for e in metrics] == [4, 3, 2, 1]
    assert metrics[0]["message"] == "Step 4/4: training loss 0.9000, validation loss 1.0000"
    assert {e["object"] for e in events["data"]} == {"fine_tuning.job.event"} and events["has_more"] is False
    page = mine.get(f"/api/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 2, "after": events["data"][1]["id"]})
    assert [e["id"] for e in page.json()["data"]] == [e["id"] for e in events["data"][2:4]]
    checkpoints = mine.get(f"/api/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert [(c["step_number"], c["metrics"]["train_loss"]) for c in checkpoints] == [(4, 0.9), (2, 1.5)]
    assert checkpoints[0]["fine_tuned_model_checkpoint"] == f"{done.model_name}:ckpt-step-4"
    assert checkpoints[0]["fine_tuning_job_id"] == job_id and checkpoints[0]["object"] == "fine_tuning.job.checkpoint"
    assert mine.post(f"/api/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "succeeded"  # stays ended


def test_a_job_not_yet_submitted_is_cancelled_at_once(owner: Any, safetensors: ModelVariant) -> None:
    mine = api(owner)
    job_id = create(mine).json()["id"]
    assert mine.post(f"/api/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert mine.get(f"/api/v1/fine_tuning/jobs/{job_id}").status_code == 200
    assert mine.get(f"/api/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 405


def test_everything_is_the_owners_alone(owner: Any, other_user: Any, safetensors: ModelVariant) -> None:
    mine, theirs = api(owner), api(other_user)
    job_id = create(mine).json()["id"]
    progressed(job_id)
    file_id = FineTuneRun.objects.get().openai["training_file"]
    for path in ("", "/events", "/checkpoints"):
        reply = theirs.get(f"/api/v1/fine_tuning/jobs/{job_id}{path}")
        assert (reply.status_code, reply.json()["error"]["code"]) == (404, "fine_tuning_job_not_found"), path
    assert theirs.post(f"/api/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 404
    assert theirs.get("/api/v1/fine_tuning/jobs").json()["data"] == []
    assert theirs.get(f"/api/v1/files/{file_id}/content").status_code == 404
    reply = create(theirs, training_file=file_id)  # someone else's file trains nothing
    assert (reply.status_code, reply.json()["error"]["code"]) == (404, "file_not_found")
    assert mine.get(f"/api/v1/fine_tuning/jobs/{job_id}").status_code == 200


def test_the_openai_client_speaks_it(owner: Any, other_user: Any, safetensors: ModelVariant) -> None:
    token, stranger = ApiToken.issue(owner, "script")[1], ApiToken.issue(other_user, "script")[1]

    async def calls() -> tuple[Any, ...]:
        async with sdk_client() as http, sdk_client() as their_http:
            client = openai.AsyncOpenAI(base_url="http://127.0.0.1/api/v1", api_key=token, http_client=cast(Any, http),
                                        max_retries=0)  # fmt: skip
            theirs = openai.AsyncOpenAI(base_url="http://127.0.0.1/api/v1", api_key=stranger,
                                        http_client=cast(Any, their_http), max_retries=0)  # fmt: skip
            with pytest.raises(openai.BadRequestError, match="line 1"):
                await client.files.create(file=("bad.jsonl", b'{"prompt": ""}\n'), purpose="fine-tune")
            training = await client.files.create(file=("toy.jsonl", CHAT), purpose="fine-tune")
            job = await client.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id, suffix="toy",
                                                       hyperparameters={"n_epochs": 1}, metadata=WHERE)  # fmt: skip
            await sync_to_async(progressed)(job.id)
            retrieved = await client.fine_tuning.jobs.retrieve(job.id)
            listed = [j async for j in client.fine_tuning.jobs.list()]
            events = [e async for e in client.fine_tuning.jobs.list_events(job.id)]
            checkpoints = [c async for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
            with pytest.raises(openai.NotFoundError):
                await theirs.fine_tuning.jobs.retrieve(job.id)
            with pytest.raises(openai.NotFoundError):
                await theirs.fine_tuning.jobs.list_events(job.id)
            with pytest.raises(openai.NotFoundError):
                await theirs.fine_tuning.jobs.checkpoints.list(job.id)
            return job, retrieved, listed, events, checkpoints

    job, retrieved, listed, events, checkpoints = run(calls())
    assert job.status == "validating_files" and job.hyperparameters.n_epochs == 1
    assert retrieved.status == "succeeded" and retrieved.fine_tuned_model.startswith("ft:tiny-llama:ada:toy:")
    assert [j.id for j in listed] == [job.id]
    assert events[0].message == "succeeded: trained 4 steps" and events[1].type == "metrics"
    assert [c.step_number for c in checkpoints] == [4, 2] and checkpoints[0].metrics.valid_loss == 1.0


def finished(reply: Any, state: FineTuneRun.State = FineTuneRun.State.COMPLETED) -> FineTuneRun:
    assert reply.status_code == 200, reply.text
    run = FineTuneRun.objects.get(pk=reply.json()["id"].removeprefix("ftjob-"))
    FineTuneRun.objects.filter(pk=run.pk).update(state=state, step=run.planned_steps)
    run.refresh_from_db()
    return run


def test_a_job_from_a_fine_tuned_model_trains_its_adapter_further_where_it_trained(
    owner: Any, safetensors: ModelVariant
) -> None:
    mine = api(owner)
    parent = finished(create(mine, suffix="doors", metadata={**WHERE, "lora_rank": "4", "walltime": "45"}))
    reply = create(mine, model=parent.model_name, metadata={}, hyperparameters={"n_epochs": 1})
    assert reply.status_code == 200, reply.text
    child = FineTuneRun.objects.get(parent=parent)
    assert (child.variant, child.lora_rank, child.walltime_min, child.epochs) == (parent.variant, 4, 45, 1)
    assert (child.cluster, child.partition, child.account) == (parent.cluster, parent.partition, parent.account)
    assert reply.json()["model"] == parent.model_name  # the job names the model it was asked for, as OpenAI's does


def test_a_job_from_a_fine_tuned_model_is_refused_unless_its_ones_own_completed_adapter_of_that_shape(
    owner: Any, other_user: Any, safetensors: ModelVariant
) -> None:
    mine = api(owner)
    parent = finished(create(mine, metadata={**WHERE, "lora_rank": "4"}))
    failed = finished(create(mine), FineTuneRun.State.FAILED)
    full = finished(create(mine, metadata={**WHERE, "method": "full"}))
    count = FineTuneRun.objects.count()
    for model, changes, message in [
        (failed.model_name, {}, "is failed: only a completed run has an adapter to train further"),
        (full.model_name, {}, "fine-tuned the whole model"),
        (parent.model_name, {"metadata": {"lora_rank": "8"}}, "lora_rank: ft:tiny-llama:ada::"),
        (parent.model_name, {"metadata": {"lora_rank": "8"}}, "keeps its adapter's shape"),
        (parent.model_name + ":ckpt-step-2", {}, "does not exist"),
    ]:
        reply = create(mine, model=model, **{"metadata": {}, **changes})
        assert reply.status_code in (400, 404) and message in reply.json()["error"]["message"], reply.text
    stranger = api(other_user)
    reply = create(stranger, model=parent.model_name, metadata={})
    assert (reply.status_code, reply.json()["error"]["code"]) == (404, "model_not_found")
    assert reply.json()["error"]["message"] == create(stranger, model="ft:nobody:x::1", metadata={}).json()["error"][
        "message"
    ].replace("ft:nobody:x::1", parent.model_name)  # the same answer as for a name nobody has
    assert FineTuneRun.objects.count() == count
