"""The launch form: one definition for the wizard, the POST, relaunch, the command line and --json."""

from __future__ import annotations

import html
import json
import re
from argparse import ArgumentParser
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django import forms
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.test import Client

from catalog import runtime_rules
from catalog.models import Cluster, ClusterAccount
from jobs.cluster import jobscript
from jobs.management.commands.sessions import add_launch_flags
from jobs.models import LLMSession, Purpose, State
from jobs.sessions import wizard
from jobs.sessions.actions import launch, request_cancel
from jobs.sessions.forms import ChoicesForm, HiddenLaunch, LaunchForm, values_of
from jobs.sessions.lifecycle import job_spec
from tests.conftest import HOST_KEY, LAUNCH


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"partition": "nope"}, "partition", "has no partition 'nope'"),
        ({"gpu": "h200"}, "gpu", "offers no 'h200'"),
        ({"walltime": 5000}, "walltime", "at most 1440 minutes"),
        ({"model": "GPT-2", "quant": "fp32"}, "model", "not available on Local test cluster"),
        ({"runtime": "ollama"}, "runtime", "does not offer ollama"),
        ({"context": 100000}, "context", "at most 4096"),
        ({"gpus": 0}, "gpus", "greater than or equal to 1"),
        ({"cluster": "mars"}, "cluster", "no cluster 'mars'"),
    ],
)
def test_bad_requests_are_refused_with_the_field_and_reason(
    account: ClusterAccount, owner: Any, change: dict[str, Any], field: str, message: str
) -> None:
    form = LaunchForm({**LAUNCH, **change}, user=owner)
    assert not form.is_valid()
    assert message in " ".join(str(e) for e in form.errors[field])


def test_a_cluster_without_a_pinned_host_key_takes_no_sessions(account: ClusterAccount, owner: Any) -> None:
    Cluster.objects.filter(slug="local").update(host_key="")
    with pytest.raises(ValidationError, match="no pinned SSH host key"):
        launch(owner, LAUNCH)


def test_launch_records_the_request_and_submits_after_commit(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        session = launch(owner, LAUNCH)
    assert session.state == State.PENDING and len(callbacks) == 1
    assert (session.cpus_per_node, session.memory_gib) == (2, 2)  # half of a 2-GPU node's 4 CPUs and 4 GiB
    assert [e.to_state for e in session.events.all()] == ["pending"]


@pytest.fixture
def owner_client(client: Client, owner: Any, settings: Any) -> Client:
    settings.PORTAL_WIZARD_ASKS_SLURM = False  # unit tests never reach a cluster
    client.force_login(owner)
    return client


def recommended_launch(page: str) -> str:
    """The recommended option's Launch form on a wizard page."""
    row = page[page.index('class="recommended"') :]
    return row[row.index('<form method="post"') : row.index("</form>")]


def submitted(form: str) -> dict[str, str]:
    """What a browser submits for a form of hidden inputs (an input without a value sends nothing)."""
    return {
        name: html.unescape(value)
        for name, value in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form)
    }


def test_a_batch_purpose_reaches_the_job_as_four_parallel_slots_and_is_remembered(
    owner_client: Client, owner: Any, account: ClusterAccount, django_capture_on_commit_callbacks: Any
) -> None:
    chat = wizard.build(owner, {"model": "tiny-llama", "context": "1024"}).estimate
    batch = wizard.build(owner, {"model": "tiny-llama", "context": "1024", "purpose": "batch"}).estimate
    assert chat and batch and batch.kv_cache_gib == pytest.approx(4 * chat.kv_cache_gib)  # 4 requests of 1024 tokens
    page = owner_client.get("/launch/", {"model": "tiny-llama", "context": "1024", "purpose": "batch"}).content.decode()
    assert "batch prompts (4 at a time)" in page
    posted = submitted(recommended_launch(page))
    assert posted["purpose"] == "batch"
    with django_capture_on_commit_callbacks(execute=False):
        assert owner_client.post("/launch/", {**posted, "token": "t"}).status_code == 302
    session = LLMSession.objects.get()
    assert (session.purpose, session.parallel) == (Purpose.BATCH, 4)
    assert "PARALLEL=4" in jobscript.render(job_spec(session)).splitlines()
    assert '<option value="batch" selected>' in owner_client.get("/launch/").content.decode()  # remembered
    assert "purpose=batch" in owner_client.get(f"/sessions/{session.pk}/relaunch")["Location"]


def test_each_option_carries_every_launch_field(owner_client: Client, account: ClusterAccount) -> None:
    page = owner_client.get("/launch/", {"model": "tiny-llama", "context": "1024"}).content.decode()
    names = set(re.findall(r'name="([^"]+)"', recommended_launch(page)))
    assert set(LaunchForm.base_fields) <= names


@pytest.mark.parametrize(
    "field, value",
    [
        ("context", "200"),  # below the smallest context
        ("context", "512"),
        ("context", "9000"),  # above the model's maximum
        ("walltime", "50000"),  # above 30 days
        ("walltime", "60"),
        ("idle_cancel", "2"),  # below 5 minutes
        ("idle_cancel", "30"),
        ("alias", "no spaces please"),
        ("alias", "mistral-7b"),
        ("purpose", "training"),
    ],
)
def test_the_wizard_refuses_exactly_what_a_launch_refuses(
    owner_client: Client, account: ClusterAccount, owner: Any, field: str, value: str
) -> None:
    form = LaunchForm({**LAUNCH, field: value}, user=owner)
    launch_refuses = not form.is_valid()
    page = owner_client.get("/launch/", {"model": "tiny-llama", field: value}).content.decode()
    assert ('class="error small"' in page) == launch_refuses, page
    for message in form.errors.get(field, []):
        assert html.escape(str(message)) in page


def test_an_option_whose_partition_allows_less_walltime_is_not_offered(
    owner_client: Client, account: ClusterAccount
) -> None:
    page = owner_client.get("/launch/", {"model": "tiny-llama", "context": "1024", "walltime": "2000"}).content.decode()
    assert "Launch</button>" not in page  # every local partition allows at most 1440 minutes
    assert "gpu allows at most 1440 minutes" in page


def test_the_command_line_takes_every_launch_field_and_prints_them_back(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    lab = ClusterAccount(cluster=account.cluster, kind="service", label="NLP lab", username="nlplab")
    lab.save()
    lab.members.add(owner)
    out = StringIO()
    flags = ["--cluster", "local", "--partition", "gpu", "--gpu", "a100-80g", "--gpus", "1", "--model", "tiny-llama",
             "--quant", "F16", "--runtime", "llama.cpp", "--context", "1024", "--walltime", "30", "--purpose", "batch",
             "--notify", "--idle-cancel", "45", "--account", str(lab.pk), "--alias", "tiny"]  # fmt: skip
    with django_capture_on_commit_callbacks(execute=False):
        call_command("sessions", "launch", "--user", "ada", *flags, "--json", stdout=out)
    session = LLMSession.objects.get()
    assert (session.purpose, session.parallel, session.notify_email) == (Purpose.BATCH, 4, True)
    assert (session.idle_cancel_min, session.account, session.alias) == (45, lab, "tiny")
    printed = json.loads(out.getvalue())
    assert set(LaunchForm.base_fields) <= set(printed)
    request_cancel(session, "free the alias")  # an alias names one live session
    with django_capture_on_commit_callbacks(execute=False):
        again = launch(owner, {name: printed[name] for name in LaunchForm.base_fields if printed[name] is not None})
    assert values_of(again, LaunchForm) == values_of(session, LaunchForm)


def test_every_launch_field_is_a_command_line_flag_with_the_forms_choices() -> None:
    parser = ArgumentParser()
    add_launch_flags(parser)
    flags = {action.dest: action for action in parser._actions}
    assert set(LaunchForm.base_fields) <= set(flags)
    assert list(flags["runtime"].choices or []) == list(runtime_rules.LAUNCHABLE)
    assert list(flags["purpose"].choices or []) == list(Purpose.values)


def test_relaunch_brings_back_every_choice(owner_client: Client, owner: Any, account: ClusterAccount,
                                         django_capture_on_commit_callbacks: Any) -> None:  # fmt: skip
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**LAUNCH, "purpose": "batch", "notify": True, "idle_cancel": 45, "alias": "tiny"})
    location = owner_client.get(f"/sessions/{session.pk}/relaunch")["Location"]
    page = owner_client.get(location).content.decode()
    for name, value in values_of(session, ChoicesForm).items():
        assert f"{name}=" in location or value in (None, "", False), name
    assert 'value="45"' in page and 'value="tiny"' in page and "checked" in page


def test_a_launch_that_names_only_the_model_and_where_takes_that_places_defaults(
    account: ClusterAccount, owner: Any
) -> None:
    partition = account.cluster.partitions.get(name="gpu_devel")
    where = {"cluster": "local", "partition": "gpu_devel", "gpu": "h100", "gpus": 1, "model": "tiny-llama"}
    form = LaunchForm(where, user=owner)
    assert form.is_valid(), form.errors
    columns = form.session_columns()
    assert columns["walltime_min"] == partition.default_walltime_min
    assert (columns["runtime"].kind, columns["variant"].quantization) == ("llama.cpp", "fp16")
    assert (columns["context_length"], columns["purpose"], columns["parallel"]) == (4096, Purpose.CHAT, 1)


def test_an_alias_names_one_live_session(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        first = launch(owner, {**LAUNCH, "alias": "tiny"})
    taken = LaunchForm({**LAUNCH, "alias": "tiny"}, user=owner)
    assert not taken.is_valid() and "answers to 'tiny'" in " ".join(map(str, taken.errors["alias"]))
    assert not ChoicesForm({"model": "tiny-llama", "alias": "tiny"}, user=owner).is_valid()  # the wizard says so too
    request_cancel(first, "test")
    assert LaunchForm({**LAUNCH, "alias": "tiny"}, user=owner).is_valid()  # free again once it has ended


@pytest.mark.parametrize("alias", ["tiny-llama", "TINY-llama", "Llama-3.1-8B-Instruct"])
def test_an_alias_may_not_be_a_catalog_models_name(account: ClusterAccount, owner: Any, alias: str) -> None:
    # A catalog name names the caller's own sessions of that model; an alias spelt the same would stand in for it.
    for form in (
        LaunchForm({**LAUNCH, "alias": alias}, user=owner),
        ChoicesForm({**LAUNCH, "alias": alias}, user=owner),
    ):
        assert not form.is_valid() and "is a model in the catalog" in " ".join(map(str, form.errors["alias"]))
    with pytest.raises(ValidationError, match="is a model in the catalog"):
        launch(owner, {**LAUNCH, "alias": alias})
    assert not LLMSession.objects.exists()


def test_a_refused_choice_offers_no_launch_with_the_default_in_its_place(
    owner_client: Client, account: ClusterAccount
) -> None:
    page = owner_client.get("/launch/", {"model": "tiny-llama", "idle_cancel": "2"}).content.decode()
    assert "GPU memory" in page  # the estimate goes on with the default
    assert "Launch</button>" not in page and "correct the choices above to launch" in page


def test_vllm_gets_only_gpu_counts_that_divide_the_attention_heads(example_catalog: Path, owner: Any) -> None:
    cluster = Cluster.objects.get(slug="mccleary")
    Cluster.objects.filter(pk=cluster.pk).update(host_key=f"{cluster.login_host} {HOST_KEY.split(' ', 1)[1]}")
    ClusterAccount.objects.create(cluster=cluster, user=owner, username="ada")
    request = {"cluster": "mccleary", "partition": "gpu", "gpu": "a100-80g", "model": "Llama-3.1-8B-Instruct",
               "quant": "bf16", "runtime": "vllm", "context": 4096}  # fmt: skip
    assert LaunchForm({**request, "gpus": 2}, user=owner).is_valid()
    odd = LaunchForm({**request, "gpus": 3}, user=owner)
    assert not odd.is_valid() and "32 attention heads" in " ".join(map(str, odd.errors["gpus"]))
    # Across nodes vLLM's workers would take unauthenticated connections: refused, and the reason given.
    spread = LaunchForm({**request, "gpus": 4, "nodes": 2}, user=owner)
    assert not spread.is_valid() and "unauthenticated" in " ".join(map(str, spread.errors["nodes"]))


def test_a_user_gets_no_more_live_sessions_or_gpus_than_the_cluster_allows(
    account: ClusterAccount, owner: Any, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.PORTAL_MAX_SESSIONS_PER_USER, settings.PORTAL_MAX_GPUS_PER_USER = 2, 3  # the site's defaults
    with django_capture_on_commit_callbacks(execute=False):
        first = launch(owner, {**LAUNCH, "gpus": 2})
        launch(owner, LAUNCH)
    third = LaunchForm(LAUNCH, user=owner)
    assert not third.is_valid() and "You have 2 live sessions on Local test cluster" in str(third.errors["cluster"])
    request_cancel(first, "make room")
    assert LaunchForm(LAUNCH, user=owner).is_valid()
    too_many = LaunchForm({**LAUNCH, "gpus": 2, "nodes": 2}, user=owner)
    assert not too_many.is_valid() and "at most 3 there" in str(too_many.errors["gpus"])
    Cluster.objects.filter(slug="local").update(max_sessions_per_user=1, max_gpus_per_user=16)  # the cluster's own
    assert "the most one user may have there" in str(LaunchForm(LAUNCH, user=owner).errors["cluster"])
    with pytest.raises(ValidationError, match="the most one user may have"):  # and launch() checks it again
        launch(owner, LAUNCH)


def test_a_safetensors_model_is_offered_vllm_first_then_transformers_and_embeddings_where_a_runtime_serves_them(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from catalog.models import ModelCard, ModelVariant, VariantLocation
    from jobs.sessions.forms import available_runtimes

    local = Cluster.objects.get(slug="local")
    variant = ModelVariant.objects.create(
        model=ModelCard.objects.get(name="tiny-llama"), quantization="bf16", format="safetensors", size_gib=0.001
    )
    VariantLocation.objects.create(variant=variant, cluster=local, path="/models/tiny-llama")
    assert available_runtimes(variant, local) == ["vllm", "transformers"]
    request = {**LAUNCH, "quant": "bf16", "purpose": "embeddings"}
    assert LaunchForm({**request, "runtime": "vllm"}, user=owner).is_valid()
    refused = LaunchForm({**request, "runtime": "transformers"}, user=owner)
    assert not refused.is_valid()
    assert "cannot serve embeddings; choose llama.cpp, ollama, vllm" in " ".join(map(str, refused.errors["purpose"]))
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**request, "runtime": "vllm"})
    assert "EMBEDDINGS=1" in jobscript.render(job_spec(session)).splitlines()
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**LAUNCH, "quant": "bf16", "runtime": "transformers"})
    script = jobscript.render(job_spec(session))
    assert "EMBEDDINGS=0" in script.splitlines() and "tfserve.py" in script


def test_a_vllm_session_starts_with_its_cards_tool_call_parser(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from catalog.models import ModelCard, ModelVariant, VariantLocation

    card = ModelCard.objects.get(name="tiny-llama")
    variant = ModelVariant.objects.create(model=card, quantization="bf16", format="safetensors", size_gib=0.001)
    VariantLocation.objects.create(variant=variant, cluster=Cluster.objects.get(slug="local"), path="/models/tiny")
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**LAUNCH, "quant": "bf16", "runtime": "vllm"})
    assert job_spec(session).tool_call_parser == ""  # the example's tiny-llama names none
    ModelCard.objects.filter(pk=card.pk).update(tool_call_parser="hermes")
    fresh = LLMSession.objects.get(pk=session.pk)
    assert "TOOL_CALL_PARSER=hermes" in jobscript.render(job_spec(fresh)).splitlines()


def test_staging_reaches_the_job_as_the_cluster_says_unless_the_launch_declines(
    owner: Any, account: ClusterAccount, django_capture_on_commit_callbacks: Any
) -> None:
    Cluster.objects.filter(slug="local").update(stage_to="$TMPDIR", stage_keep=False)
    with django_capture_on_commit_callbacks(execute=False):
        staged = launch(owner, LAUNCH)
        declined = launch(owner, {**LAUNCH, "no_staging": "on"})
    lines = jobscript.render(job_spec(staged)).splitlines()
    assert "STAGE_TO='$TMPDIR'" in lines and "STAGE_KEEP=0" in lines
    assert declined.skip_staging and "STAGE_TO=''" in jobscript.render(job_spec(declined)).splitlines()
    assert job_spec(staged).memory_gib == staged.memory_gib


def test_staging_in_shared_memory_asks_slurm_for_the_copys_memory_too(
    owner: Any, account: ClusterAccount, django_capture_on_commit_callbacks: Any
) -> None:
    Cluster.objects.filter(slug="local").update(stage_to="/dev/shm")
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, LAUNCH)
    session.variant.size_gib = 3.2
    assert job_spec(session).memory_gib == session.memory_gib + 4


def test_a_runtime_that_keeps_its_own_store_is_not_staged() -> None:
    assert [r.kind for r in runtime_rules.RUNTIMES.values() if r.launchable and not r.stages_weights] == ["ollama"]


def test_a_wizard_options_hidden_inputs_are_what_the_widgets_would_render(owner: Any, account: ClusterAccount) -> None:
    values = {**LAUNCH, "alias": 'a"b<c', "nodes": 1, "account": account.pk, "notify": True}
    form = LaunchForm(initial=values, user=owner, auto_id=False)
    for field in form.fields.values():
        field.widget = forms.HiddenInput()
    launch = HiddenLaunch(values, [(account.pk, "ada")])
    assert str(launch.hidden_inputs()) == "".join(str(bound) for bound in form.hidden_fields())
    assert "alias=a%22b%3Cc" in launch.query() and not launch.accounts
    several = HiddenLaunch(values, [(account.pk, "ada"), (account.pk + 1, "lab")])
    assert 'name="account"' not in several.hidden_inputs() and '<select name="account">' in several.account_menu()
