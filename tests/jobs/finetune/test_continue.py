"""Training an adapter further (docs/finetune.md): a run from one of the owner's own completed LoRA or QLoRA runs
(`from`: its uuid or model name) takes its base, adapter shape and place, refuses what would not be that adapter
trained further, and its job hands the trainer the parent's adapter directory, which the gate takes; the page, the
command line and the run's record say where it started from."""

from __future__ import annotations

import json
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db.models import ProtectedError
from django.test import Client

from catalog.models import Cluster, ClusterAccount
from jobs import gatekeeping
from jobs.cluster import jobscript, layout, remote
from jobs.finetune import lifecycle
from jobs.models import FineTuneRun
from portal import gate_program
from tests.jobs.finetune.conftest import chat_lines
from tests.jobs.test_gatekeeping import table_of

Start = Callable[..., FineTuneRun]


def completed(run: FineTuneRun, state: FineTuneRun.State = FineTuneRun.State.COMPLETED) -> FineTuneRun:
    FineTuneRun.objects.filter(pk=run.pk).update(state=state, step=run.planned_steps)
    run.refresh_from_db()
    return run


@pytest.fixture
def parent(start: Start) -> FineTuneRun:
    """A completed LoRA run of rank 4 with a suffix and a walltime of its own."""
    return completed(start(lora_rank=4, lora_alpha=8, target_modules="qv", suffix="doors", walltime=45))


def test_a_run_trains_further_from_an_adapter_with_its_base_shape_and_place(start: Start, parent: FineTuneRun) -> None:
    left_out = {name: "" for name in ("model", "cluster", "partition", "gpu", "gpus", "walltime")}
    child = start(**{"from": parent.model_name, **left_out})
    assert child.parent == parent and child.variant == parent.variant and child.method == "lora"
    shape = ("lora_rank", "lora_alpha", "lora_dropout", "target_modules")
    assert [getattr(child, name) for name in shape] == [4, 8, parent.lora_dropout, "qv"]
    place = ("cluster", "partition", "gpu_type", "account", "walltime_min", "cpus_per_node", "memory_gib")
    assert [getattr(child, name) for name in place] == [getattr(parent, name) for name in place]
    assert f"training further {parent.model_name}" in child.events.get().reason
    by_uuid = start(**{"from": str(parent.pk), "epochs": 1})  # by its uuid; the other hyperparameters are its own
    assert by_uuid.parent == parent and by_uuid.epochs == 1


def test_a_run_that_trains_an_adapter_further_keeps_its_shape(start: Start, parent: FineTuneRun) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"lora_rank": 16}, "has LoRA rank 4: a run that trains it further keeps its adapter's shape"),
        ({"lora_alpha": 32}, "LoRA alpha 8"),
        ({"target_modules": "all"}, "leave target_modules out, or give qv"),
        ({"method": "full"}, "choose LoRA or QLoRA, not full"),
        ({"quant": "F16"}, "is an adapter of tiny-llama bf16"),
    ]
    for changes, message in cases:
        with pytest.raises(ValidationError) as refused:
            start(**{"from": parent.model_name, **changes})
        assert message in str(refused.value), changes
    assert start(**{"from": parent.model_name, "lora_rank": 4, "target_modules": "qv"}).parent == parent


def test_only_a_completed_lora_or_qlora_run_is_trained_further(start: Start) -> None:
    failed = completed(start(), FineTuneRun.State.FAILED)
    full = completed(start(method="full", learning_rate=1e-5))
    live = start()
    for run, message in [(failed, "is failed: only a completed run"), (full, "fine-tuned the whole model"),
                         (live, "is queued: only a completed run")]:  # fmt: skip
        with pytest.raises(ValidationError) as refused:
            start(**{"from": run.model_name})
        assert message in str(refused.value)
    assert FineTuneRun.objects.count() == 3


def test_only_ones_own_runs_are_trained_further(
    start: Start, parent: FineTuneRun, other_user: Any, example_catalog: Path
) -> None:
    ClusterAccount.objects.create(cluster=Cluster.objects.get(slug="local"), user=other_user, username="grace")
    for named in (parent.model_name, str(parent.pk), "ft:tiny-llama:grace:doors:" + str(parent.pk)[:8], "nonsense"):
        with pytest.raises(ValidationError) as refused:
            start(user=other_user, **{"from": named})
        assert "a run trains further only from one of your own completed runs" in str(refused.value), named


def test_the_adapter_is_trained_further_in_its_cluster_users_home_on_its_cluster(
    start: Start, parent: FineTuneRun, owner: Any
) -> None:
    lab = ClusterAccount.objects.create(cluster=parent.cluster, kind=ClusterAccount.Kind.SERVICE, username="nlp")
    lab.members.set([owner])
    with pytest.raises(ValidationError) as refused:
        start(**{"from": parent.model_name, "account": lab.pk})
    assert "adapter is in the home of ada on" in str(refused.value) and "runs as ada" in str(refused.value)
    with pytest.raises(ValidationError) as refused:
        start(**{"from": parent.model_name, "cluster": "grace", "partition": "gpu"})
    assert "copies no adapter between clusters" in str(refused.value)


def test_the_job_hands_the_trainer_the_parents_adapter_and_the_gate_takes_it(start: Start, parent: FineTuneRun) -> None:
    child = start(**{"from": parent.model_name})
    script = jobscript.render(lifecycle.job_spec(child))
    assert f"PARENT_RUN={parent.pk}" in script and '--parent "$SESSIONS_DIR/$PARENT_RUN/$ADAPTER_DIR"' in script
    files = lifecycle._files(child)
    assert json.loads(files[layout.NAMES.train_config_file])["parent"] == str(parent.pk)
    assert json.loads(lifecycle._files(parent)[layout.NAMES.train_config_file])["parent"] == ""
    assert "PARENT_RUN=''" in jobscript.render(lifecycle.job_spec(parent))
    table = table_of(gatekeeping.program(child.cluster))
    upload = table["verbs"]["submit"]["upload"]
    gate_program.check_upload(remote.submit_payload(script, "sk-hpcllm-" + "a" * 43, files).stdin, upload, table, "s")
    # Only a run's uuid: a path (another home's, or any file) in its place is not the portal's job script.
    forged = script.replace(f"PARENT_RUN={parent.pk}", "PARENT_RUN=/home/someone/adapter")
    with pytest.raises(SystemExit):
        gate_program.check_upload(remote.submit_payload(forged, "sk-hpcllm-" + "a" * 43, files).stdin, upload, table,
                                  "s")  # fmt: skip


def test_a_parent_stays_while_a_run_says_it_started_from_it(start: Start, parent: FineTuneRun) -> None:
    start(**{"from": parent.model_name})
    with pytest.raises(ProtectedError):
        parent.delete()


def test_the_pages_offer_training_further_and_say_where_a_run_started_from(
    start: Start, parent: FineTuneRun, owner: Any, other_user: Any, client: Client
) -> None:
    client.force_login(owner)
    assert f"/finetune/new/?from={parent.pk}" in client.get(f"/finetune/{parent.pk}/").content.decode()
    offered = client.get("/finetune/new/?model=tiny-llama").content.decode()
    assert f'<option value="{parent.pk}">{parent.model_name}' in offered
    page = client.get(f"/finetune/new/?from={parent.pk}").content.decode()
    assert "Trains further the adapter of" in page and f'name="from" value="{parent.pk}"' in page
    assert 'name="lora_rank" value="4"' in page and 'value="qv" selected' in page
    data = BytesIO(chat_lines())
    data.name = "more.jsonl"
    posted = {"from": str(parent.pk), "model": "tiny-llama", "cluster": "local", "partition": "gpu",
              "gpu": "a100-80g", "gpus": "1", "walltime": "30", "lora_rank": "4", "lora_alpha": "8",
              "lora_dropout": "0.05", "target_modules": "qv", "training_file": data}  # fmt: skip
    reply = client.post("/finetune/new/", posted)
    assert reply.status_code == 302, reply.content.decode()[-3000:]
    child = FineTuneRun.objects.get(parent=parent)
    shown = client.get(f"/finetune/{child.pk}/").content.decode()
    assert "Continued from" in shown and f'href="/finetune/{parent.pk}/">{parent.model_name}</a>' in shown
    data.seek(0)
    refused = client.post("/finetune/new/", {**posted, "lora_rank": "16", "training_file": data}).content.decode()
    assert "a run that trains it further keeps its adapter" in refused and FineTuneRun.objects.count() == 2


def test_the_command_line_trains_further_by_name_and_show_says_its_parent(
    parent: FineTuneRun, tmp_path: Path, capsys: Any, django_capture_on_commit_callbacks: Any
) -> None:
    data = tmp_path / "more.jsonl"
    data.write_bytes(chat_lines())
    with pytest.raises(CommandError, match="keeps its adapter's shape"):
        call_command("finetune", "create", "--user", "ada", "--from", parent.model_name, "--lora-rank", "8",
                     "--training-file", str(data))  # fmt: skip
    with pytest.raises(CommandError, match="model: This field is required"):
        call_command("finetune", "create", "--user", "ada", "--training-file", str(data))
    with django_capture_on_commit_callbacks(execute=False):
        call_command("finetune", "create", "--user", "ada", "--from", parent.model_name, "--training-file", str(data),
                     "--json")  # fmt: skip
    created = json.loads(capsys.readouterr().out)
    assert (created["parent"], created["parent_model"], created["lora_rank"]) == (str(parent.pk), parent.model_name, 4)
    call_command("finetune", "show", created["uuid"], "--json")
    assert json.loads(capsys.readouterr().out)["parent"] == str(parent.pk)
    call_command("finetune", "show", str(parent.pk), "--json")
    assert json.loads(capsys.readouterr().out)["parent"] is None
