"""Fine-tune adapters in the launch wizard and on the session's page (docs/finetune.md, serving): the wizard offers the
runs the launch form accepts, its Launch buttons carry the chosen ones, the session's page names them, and the
command line's list reads them in a query however many sessions there are."""

from __future__ import annotations

import html
import json
import re
import uuid
from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from catalog.models import Cluster, ClusterAccount, ModelVariant
from jobs.models import FineTuneRun, LLMSession
from jobs.sessions.actions import launch
from tests.conftest import LAUNCH
from tests.jobs.finetune.conftest import safetensors, start  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db
CHOICES = {"model": "tiny-llama", "quant": "F16", "runtime": "llama.cpp", "context": "1024"}


def completed(run: FineTuneRun, **changes: Any) -> FineTuneRun:
    FineTuneRun.objects.filter(pk=run.pk).update(state=FineTuneRun.State.COMPLETED, **changes)
    return FineTuneRun.objects.select_related("variant__model", "owner").get(pk=run.pk)


def copy_of(run: FineTuneRun, **changes: Any) -> FineTuneRun:
    """Another completed run like this one, with these changes (another owner, another model)."""
    copy = FineTuneRun.objects.get(pk=run.pk)
    copy.pk = uuid.uuid4()
    for name, value in changes.items():
        setattr(copy, name, value)
    copy.save(force_insert=True)
    return FineTuneRun.objects.select_related("variant__model", "owner").get(pk=copy.pk)


@pytest.fixture
def adapter(start: Callable[..., FineTuneRun]) -> FineTuneRun:  # noqa: F811
    """A completed LoRA run of tiny-llama, the owner's, on the local cluster."""
    return completed(start(suffix="doors", lora_rank=4))


def page(client: Client, **choices: Any) -> str:
    reply = client.get("/launch/", {**CHOICES, **choices})
    assert reply.status_code == 200
    return reply.content.decode()


def offered(text: str) -> list[str]:
    """The adapters' checkboxes in step 1."""
    menu = re.search(r'<fieldset id="adapters".*?</fieldset>', text, re.S)
    return re.findall(r'name="adapter" value="([^"]+)"', menu[0]) if menu else []


def launch_fields(text: str) -> dict[str, str]:
    """The first option's Launch form, as its button posts it."""
    form = re.search(r'<form method="post" action="/launch/" class="launch">(.*?)</form>', text, re.S)
    assert form is not None
    return {name: html.unescape(value) for name, value in re.findall(r'name="([^"]+)" value="([^"]*)"', form[1])}


def test_the_wizard_offers_only_the_users_completed_adapters_of_the_model(
    wizard_client: Client,
    adapter: FineTuneRun,
    start: Callable[..., FineTuneRun],  # noqa: F811
    other_user: Any,
) -> None:
    start(suffix="training")  # not completed
    completed(start(suffix="whole"), method=FineTuneRun.Method.FULL)  # a whole model, no adapter
    others = copy_of(adapter, owner=other_user)
    gpt2 = copy_of(adapter, variant=ModelVariant.objects.filter(model__name="GPT-2").first())
    text = page(wizard_client)
    assert offered(text) == [adapter.model_name]
    assert others.model_name not in text and gpt2.model_name not in text
    # Nothing where a session could load none: an embeddings session, or a user without runs.
    assert 'id="adapters"' not in page(wizard_client, purpose="embeddings")
    FineTuneRun.objects.filter(pk=adapter.pk).delete()
    assert 'id="adapters"' not in page(wizard_client)


def test_the_chosen_adapters_go_with_every_launch(wizard_client: Client, adapter: FineTuneRun) -> None:
    assert launch_fields(page(wizard_client)).get("adapter", "") == ""  # none chosen, none loaded
    text = page(wizard_client, adapter=[adapter.model_name, "ft:someone-elses"])  # what is not offered is dropped
    assert re.search(rf'name="adapter" value="{re.escape(adapter.model_name)}"[^>]* checked', text)
    fields = launch_fields(text)
    assert fields["adapter"] == adapter.model_name
    reply = wizard_client.post("/launch/", {**fields, "token": "t"})
    assert reply.status_code == 302
    assert list(LLMSession.objects.get().adapters.all()) == [adapter]


def test_an_option_that_cannot_reach_the_chosen_adapter_says_why(wizard_client: Client, adapter: FineTuneRun) -> None:
    FineTuneRun.objects.filter(pk=adapter.pk).update(cluster=Cluster.objects.get(slug="v100"))
    text = page(wizard_client, adapter=adapter.model_name)
    assert offered(text) == [adapter.model_name]
    assert "adapter is on V100 cluster: launch on that cluster" in html.unescape(text)
    assert "data-launch" not in text


def test_the_session_page_names_its_adapters_and_a_relaunch_keeps_them(
    wizard_client: Client, adapter: FineTuneRun, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**LAUNCH, "adapter": adapter.model_name})
    text = wizard_client.get(f"/sessions/{session.pk}/").content.decode()
    assert re.search(rf'id="adapters"><code>{re.escape(adapter.model_name)}</code>', text)
    relaunch = wizard_client.get(f"/sessions/{session.pk}/relaunch", follow=True).content.decode()
    assert offered(relaunch) == [adapter.model_name] and launch_fields(relaunch)["adapter"] == adapter.model_name
    plain = launch(owner, {**LAUNCH, "alias": "plain"})
    assert 'id="adapters"' not in wizard_client.get(f"/sessions/{plain.pk}/").content.decode()
    out = StringIO()
    call_command("sessions", "show", str(session.pk), "--json", stdout=out)
    assert json.loads(out.getvalue())["adapter"] == adapter.model_name


def test_the_command_lines_list_reads_the_adapters_in_one_query_however_many_sessions(
    adapter: FineTuneRun, owner: Any, account: ClusterAccount, django_capture_on_commit_callbacks: Any
) -> None:
    second = copy_of(adapter, suffix="windows")

    def listed() -> tuple[list[dict[str, Any]], int]:
        out = StringIO()
        with CaptureQueriesContext(connection) as queries:
            call_command("sessions", "list", "--json", stdout=out)
        return json.loads(out.getvalue()), len(queries)

    with django_capture_on_commit_callbacks(execute=False):
        launch(owner, {**LAUNCH, "adapter": f"{adapter.model_name},{second.model_name}"})
        _, one = listed()
        for _ in range(4):
            launch(owner, {**LAUNCH, "adapter": adapter.model_name})
    rows, five = listed()
    assert five == one
    names = sorted([adapter.model_name, second.model_name], key=lambda name: name.split(":")[-1])
    assert sorted(row["adapter"] for row in rows) == sorted([",".join(names)] + [adapter.model_name] * 4)
