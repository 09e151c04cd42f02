"""A fine-tune run from the form to its job script: the launch's checks, the method's and the data's refusals before
anything is created, the job the gate accepts, the pages only its owner (and support) sees, and the command line."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import Client

from catalog.models import Cluster, ClusterRuntime
from jobs import gatekeeping
from jobs.cluster import jobscript, layout, remote
from jobs.finetune import lifecycle
from jobs.models import FineTuneRun, TrainingRuntime
from portal import gate_program
from tests.jobs.finetune.conftest import WHERE
from tests.jobs.test_gatekeeping import table_of

Start = Callable[..., FineTuneRun]
QUERIES = 4  # My fine-tune runs: the session, the user, the runs with their models and owners, those shared with me


def test_a_run_is_created_with_its_checked_data_and_planned_steps(start: Start, owner: Any) -> None:
    run = start(epochs=2, batch_size=2, gradient_accumulation=2, validation_split=0.34)
    assert (run.state, run.method, run.variant.format, run.runtime.runtime.kind) == ("queued", "lora", "safetensors",
                                                                                     "transformers")  # fmt: skip
    assert (run.train_examples, run.valid_examples, run.planned_steps) == (4, 2, 2)  # 2 epochs x 1 step of 4
    assert run.precision == "bf16" and run.estimate_gib > 0 and run.gpus_per_node == 1
    assert run.model_name == f"ft:tiny-llama:ada::{str(run.pk)[:8]}"
    assert run.train_file.read().count(b"\n") == 4 and run.valid_file.read().count(b"\n") == 2
    assert "4 examples" in run.events.get().reason


def test_nothing_is_created_for_a_bad_file_and_the_error_names_the_line(start: Start) -> None:
    with pytest.raises(ValidationError) as refused:
        start(b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{"x": 1}\n')
    assert "line 2: each line needs messages, or prompt and completion" in str(refused.value)
    assert not FineTuneRun.objects.exists()


def test_qlora_is_refused_on_an_environment_without_cuda_bitsandbytes(start: Start, account: Any) -> None:
    with pytest.raises(ValidationError) as refused:
        start(method="qlora")
    assert "QLoRA needs bitsandbytes built for CUDA" in str(refused.value) and not FineTuneRun.objects.exists()
    install = ClusterRuntime.objects.get(cluster__slug="local", runtime__kind="transformers")
    TrainingRuntime.objects.create(runtime=install, cuda_bitsandbytes=True)
    assert start(method="qlora").method == "qlora"  # the trainer checks again on the node, and says why it cannot


def test_the_launchs_own_checks_apply(start: Start) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"quant": "F16"}, "safetensors"),
        ({"gpus": 2}, "one GPU"),
        ({"partition": "nowhere"}, "has no partition 'nowhere'"),
        ({"walltime": 10_000}, "allows at most"),
        ({"max_seq_length": 131072, "batch_size": 1024, "gradient_checkpointing": "off"}, "usable"),
    ]
    for changes, message in cases:
        with pytest.raises(ValidationError) as refused:
            start(**changes)
        assert message in str(refused.value), changes


def test_the_job_trains_on_the_runtimes_python_warned_before_its_time_and_the_gate_takes_it(
    start: Start, example_catalog: Path
) -> None:
    run = start()
    spec = lifecycle.job_spec(run)
    script = jobscript.render(spec)
    assert "#SBATCH --signal=B:USR1@180" in script and "#SBATCH --requeue" in script
    assert script.endswith(jobscript.trainer_body()) and "finetune.py" in script
    files = lifecycle._files(run)
    settings = json.loads(files[layout.NAMES.train_config_file])
    assert settings["planned_steps"] == run.planned_steps and settings["method"] == "lora"
    payload = remote.submit_payload(script, "sk-hpcllm-" + "a" * 43, files)
    local = Cluster.objects.get(slug="local")
    table = table_of(gatekeeping.program(local))
    gate_program.check_upload(payload.stdin, table["verbs"]["submit"]["upload"], table, "submit")  # no SystemExit
    with tarfile.open(fileobj=BytesIO(payload.stdin)) as tar:
        assert set(tar.getnames()) == {"job.sh", "api_key", "finetune.py", "train.jsonl", "finetune.json"}


def test_a_run_is_its_owners_alone(
    start: Start, owner: Any, other_user: Any, support_user: Any, client: Client
) -> None:
    run = start()
    client.force_login(other_user)
    assert client.get(f"/finetune/{run.pk}/").status_code == 404
    assert client.post(f"/finetune/{run.pk}/cancel").status_code == 404
    assert str(run.pk) not in client.get("/finetune/").content.decode()
    client.force_login(support_user)
    assert client.get(f"/finetune/{run.pk}/").status_code == 200
    client.force_login(owner)
    page = client.get(f"/finetune/{run.pk}/").content.decode()
    assert run.model_name in page and "<svg" in page and "Loss by training step" in page
    assert run.model_name in client.get("/finetune/").content.decode()
    assert client.post(f"/finetune/{run.pk}/cancel").status_code == 302
    run.refresh_from_db()
    assert run.state == "cancelled"  # nothing was submitted: it ends at once


def test_the_new_run_page_takes_the_data_and_shows_refusals(owner: Any, safetensors: Any, client: Client) -> None:
    client.force_login(owner)
    assert "training data" in client.get("/finetune/new/?model=tiny-llama").content.decode()
    bad = BytesIO(b"{oops\n")
    bad.name = "bad.jsonl"
    page = client.post("/finetune/new/", {**WHERE, "training_file": bad}).content.decode()
    assert "line 1: invalid JSON" in page and not FineTuneRun.objects.exists()


def test_the_command_line_creates_lists_shows_and_refuses(
    owner: Any, safetensors: Any, tmp_path: Path, capsys: Any, django_capture_on_commit_callbacks: Any
) -> None:
    data = tmp_path / "toy.jsonl"
    data.write_bytes(b'{"prompt": "2+2=", "completion": "4"}\n' * 3)
    where = ["--user", "ada", "--model", "tiny-llama", "--cluster", "local", "--partition", "gpu", "--gpu",
             "a100-80g", "--gpus", "1", "--walltime", "30", "--training-file", str(data)]  # fmt: skip
    with pytest.raises(CommandError, match="QLoRA needs bitsandbytes built for CUDA"):
        call_command("finetune", "create", *where, "--method", "qlora")
    data.write_bytes(b'{"prompt": "2+2=", "completion": "4"}\n[1]\n')
    with pytest.raises(CommandError, match="line 2: each line must be a JSON object"):
        call_command("finetune", "create", *where)
    data.write_bytes(b'{"prompt": "2+2=", "completion": "4"}\n' * 3)
    with django_capture_on_commit_callbacks(execute=False):
        call_command("finetune", "create", *where, "--epochs", "2", "--batch-size", "1", "--gradient-accumulation",
                     "1", "--json")  # fmt: skip
    created = json.loads(capsys.readouterr().out)
    assert (created["planned_steps"], created["data_format"], created["state"]) == (6, "prompt-completion", "queued")
    call_command("finetune", "list")
    assert created["uuid"] in capsys.readouterr().out
    call_command("finetune", "show", created["uuid"], "--json")
    assert json.loads(capsys.readouterr().out)["events"][0]["to"] == "queued"
    call_command("finetune", "cancel", created["uuid"])
    assert FineTuneRun.objects.get(pk=created["uuid"]).state == "cancelled"


def test_the_wizards_fine_tune_plan_links_to_a_new_run_where_it_fits(
    owner: Any, account: Any, client: Client, settings: Any
) -> None:
    settings.PORTAL_WIZARD_ASKS_SLURM = False
    client.force_login(owner)
    page = client.get("/launch/", {"model": "tiny-llama", "quant": "fp16", "context": "1024", "purpose": "lora"})
    text = page.content.decode()
    assert "Fine-tune here…" in text and "data-launch" not in text
    assert "/finetune/new/?model=tiny-llama&amp;cluster=local&amp;partition=gpu&amp;gpu=" in text
    assert "method=lora" in text
    new = client.get("/finetune/new/?model=tiny-llama&cluster=local&partition=gpu&gpu=a100-80g&gpus=1&method=qlora")
    assert 'value="qlora" selected' in new.content.decode()


def test_my_fine_tune_runs_lists_mine_in_a_fixed_number_of_queries(
    start: Start, owner: Any, client: Client, django_assert_num_queries: Any
) -> None:
    runs = [start(suffix=f"s{i}") for i in range(3)]
    client.force_login(owner)
    client.get("/finetune/")  # the session and the user, read once
    with django_assert_num_queries(QUERIES):
        page = client.get("/finetune/").content.decode()
    assert all(run.model_name in page for run in runs)
