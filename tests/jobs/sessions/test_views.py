"""The researcher's pages with Django's test client: sign-in, wizard, sessions, access rules and query counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from catalog import architecture
from catalog.models import (
    Cluster,
    ClusterAccount,
    GPUType,
    ModelCard,
    ModelVariant,
    NodeGroup,
    Partition,
    VariantLocation,
)
from jobs.models import LLMSession, State, transition
from jobs.sessions.actions import launch
from tests.conftest import HOST_KEY

LAUNCH = {
    "cluster": "local", "partition": "gpu", "gpu": "a100-80g", "gpus": "1", "nodes": "1", "model": "tiny-llama",
    "quant": "fp16", "runtime": "llama.cpp", "context": "1024", "walltime": "30",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _no_ssh(settings: Any) -> None:
    """Unit tests never touch the network; the wizard's Slurm estimates are tested in tests/e2e."""
    settings.PORTAL_WIZARD_ASKS_SLURM = False


@pytest.fixture
def owner_client(client: Client, owner: Any) -> Client:
    client.force_login(owner)
    return client


@pytest.fixture
def session(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> LLMSession:
    with django_capture_on_commit_callbacks(execute=False):
        return launch(owner, LAUNCH)


def test_pages_need_a_signed_in_user(client: Client, db: None) -> None:
    for url in ("/launch/", "/sessions/", "/clusters/accounts/"):
        reply = client.get(url)
        assert reply.status_code == 302 and reply["Location"].startswith("/accounts/login/")


def test_sign_in_with_a_password_lands_on_my_sessions(client: Client, owner: Any) -> None:
    page = client.get("/accounts/login/")
    assert b'autocomplete="current-password"' in page.content
    bad = client.post("/accounts/login/", {"username": "ada", "password": "wrong"})
    assert bad.status_code == 200 and b'value="ada"' in bad.content  # what was typed is kept
    good = client.post("/accounts/login/", {"username": "ada", "password": "correct horse battery"})
    assert good.status_code == 302 and good["Location"] == "/sessions/"


def test_the_wizard_shows_the_estimate_and_the_options_with_the_recommended_first(
    owner_client: Client, account: ClusterAccount
) -> None:
    page = owner_client.get(
        "/launch/", {"model": "tiny-llama", "quant": "fp16", "runtime": "llama.cpp", "context": "2048"}
    )
    text = page.content.decode()
    assert "GPU memory:" in text and "<svg" in text and "KV cache" in text
    assert text.index("Recommended") < text.index("Launch</button>")
    assert 'name="cluster" value="local"' in text
    longer = owner_client.get("/launch/", {"model": "tiny-llama", "quant": "fp16", "context": "4096"},
                              headers={"HX-Request": "true"})  # fmt: skip
    assert longer.status_code == 200 and "<html" not in longer.content.decode()
    assert 'value="4096"' in longer.content.decode()


def test_the_wizard_says_why_vllm_is_not_split_over_nodes(owner_client: Client, example_catalog: Path) -> None:
    """Too big for one node of 4 x rtx3090: more nodes would hold it, but not safely with vLLM."""
    choices = {"model": "Llama-3.1-70B-Instruct", "quant": "AWQ", "runtime": "vllm", "context": "65536"}
    text = owner_client.get("/launch/", {**choices, "purpose": "batch"}).content.decode()
    row = text[text.index("4 x rtx3090") :][:1500]
    assert "vLLM runs on a single node" in row and "unauthenticated" in row and "llama.cpp" in row
    assert "21.1 GiB usable" in row  # vLLM's share (0.9) of the card, the figure it is measured against


def test_the_wizard_says_whether_the_chosen_variant_and_runtime_call_tools(
    owner_client: Client, account: ClusterAccount
) -> None:
    card = ModelCard.objects.get(name="tiny-llama")
    variant = ModelVariant.objects.create(model=card, quantization="bf16", format="safetensors", size_gib=0.001)
    VariantLocation.objects.create(variant=variant, cluster=Cluster.objects.get(slug="local"), path="/models/tiny")
    choices = {"model": "tiny-llama", "context": "1024"}

    def tool_line(**more: str) -> str:
        text = owner_client.get("/launch/", {**choices, **more}).content.decode()
        return text[text.index('id="tool-calls"') :].split("</p>")[0]

    line = tool_line(quant="bf16", runtime="vllm")
    assert "No tool calls: the model card names no tool-call format" in line and "muted" in line
    ModelCard.objects.filter(pk=card.pk).update(tool_call_parser="llama3_json")
    assert "Calls tools: vLLM reads them with its llama3_json parser" in tool_line(quant="bf16", runtime="vllm")
    assert "Calls tools: llama.cpp llama-server reads them through the model&#x27;s chat template, with --jinja" in (
        tool_line(quant="fp16", runtime="llama.cpp")
    )
    assert "No tool calls" in tool_line(quant="bf16", runtime="transformers")  # only Qwen's and Gemma 4's
    embeddings = owner_client.get("/launch/", {**choices, "quant": "fp16", "purpose": "embeddings"}).content.decode()
    assert 'id="tool-calls"' not in embeddings


def test_clusters_without_an_account_are_shown_but_not_selectable(owner_client: Client, example_catalog: Path) -> None:
    Cluster.objects.filter(slug="local").update(host_key=HOST_KEY)
    text = owner_client.get("/launch/", {"model": "tiny-llama", "context": "1024"}).content.decode()
    assert "Set up an account" in text and "Launch</button>" not in text


def test_launching_twice_with_one_form_creates_one_session(
    owner_client: Client, account: ClusterAccount, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        first = owner_client.post("/launch/", {**LAUNCH, "token": "form-1"})
        second = owner_client.post("/launch/", {**LAUNCH, "token": "form-1"})
    assert first.status_code == second.status_code == 302
    assert LLMSession.objects.count() == 1
    remembered = owner_client.get("/launch/").content.decode()
    assert 'value="30"' in remembered  # the last walltime comes back


def test_a_refused_launch_keeps_what_was_typed_and_says_why(owner_client: Client, account: ClusterAccount) -> None:
    reply = owner_client.post("/launch/", {**LAUNCH, "walltime": "2000", "token": "t"})
    text = reply.content.decode()
    assert reply.status_code == 200 and "walltime: gpu allows at most 1440 minutes" in text
    assert LLMSession.objects.count() == 0


def test_my_sessions_lists_cards_and_polls_only_while_something_can_change(
    owner_client: Client, session: LLMSession, django_assert_num_queries: Any
) -> None:
    # the auth session, the user, the sessions with their relations, their runs, their grants, who used them (where
    # the usage summaries stand, the requests, then those users' names), the sessions shared with the user, and the
    # services they may use
    with django_assert_num_queries(10):
        page = owner_client.get("/sessions/")
    text = page.content.decode()
    assert f'id="s-{session.pk}"' in text and 'hx-trigger="every 3s"' in text
    transition(session.pk, State.FAILED, cause="test", end_reason="Slurm refused the job: nope")
    text = owner_client.get("/sessions/").content.decode()
    assert 'hx-trigger="every 3s"' not in text and "Slurm refused the job: nope" in text


def test_the_query_count_does_not_grow_with_the_number_of_sessions(
    owner_client: Client, session: LLMSession, owner: Any, django_assert_num_queries: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    with django_capture_on_commit_callbacks(execute=False):
        for _ in range(5):
            launch(owner, LAUNCH)
    with django_assert_num_queries(10):
        owner_client.get("/sessions/")


def test_cancel_before_submission_ends_the_session(owner_client: Client, session: LLMSession) -> None:
    reply = owner_client.post(f"/sessions/{session.pk}/cancel")
    assert reply.status_code == 302
    session.refresh_from_db()
    assert session.state == State.CANCELLED


def test_relaunch_prefills_the_wizard(owner_client: Client, session: LLMSession) -> None:
    reply = owner_client.get(f"/sessions/{session.pk}/relaunch")
    assert reply.status_code == 302 and "model=tiny-llama" in reply["Location"] and "context=1024" in reply["Location"]


def test_only_ended_sessions_can_be_deleted(owner_client: Client, session: LLMSession) -> None:
    owner_client.post(f"/sessions/{session.pk}/delete")
    assert LLMSession.objects.filter(pk=session.pk).exists()
    transition(session.pk, State.CANCELLED, cause="test")
    owner_client.post(f"/sessions/{session.pk}/delete")
    # gone from the owner's pages, kept (hidden) for the site's usage records
    assert owner_client.get(f"/sessions/{session.pk}/").status_code == 404
    assert str(session.pk) not in owner_client.get("/sessions/").content.decode()
    assert LLMSession.objects.get(pk=session.pk).deleted_at is not None


@pytest.mark.parametrize("who", ["other_user", "staff_user"])
def test_others_even_staff_get_404_for_everything_about_a_session(
    client: Client, who: str, session: LLMSession, request: pytest.FixtureRequest
) -> None:
    client.force_login(request.getfixturevalue(who))
    base = f"/sessions/{session.pk}"
    for url in (f"{base}/", f"{base}/card", f"{base}/relaunch", f"{base}/log"):
        assert client.get(url).status_code == 404, url
    for url in (f"{base}/cancel", f"{base}/delete"):
        assert client.post(url).status_code == 404, url
    session.refresh_from_db()
    assert session.state == State.PENDING
    assert str(session.pk) not in client.get("/sessions/").content.decode()


@pytest.mark.parametrize("who", ["support_user", "admin_user"])
def test_support_staff_may_look_at_any_session(
    client: Client, who: str, session: LLMSession, request: pytest.FixtureRequest
) -> None:
    client.force_login(request.getfixturevalue(who))
    base = f"/sessions/{session.pk}"
    for url in (f"{base}/", f"{base}/card", f"{base}/log", f"{base}/chat/"):
        assert client.get(url).status_code == 200, url
    assert str(session.pk) not in client.get("/sessions/").content.decode()  # My sessions stays their own


def test_the_accounts_page_shows_the_key_and_the_command(owner_client: Client, account: ClusterAccount) -> None:
    text = owner_client.get("/clusters/accounts/").content.decode()
    assert account.public_key in text and "authorized_keys" in text and "Test connection" in text
    assert "You have no account here yet" in text  # the other clusters


def test_another_users_account_cannot_be_tested(client: Client, other_user: Any, account: ClusterAccount) -> None:
    client.force_login(other_user)
    assert client.post(f"/clusters/accounts/{account.pk}/test").status_code == 404


def test_a_researcher_with_several_accounts_chooses_one(
    owner_client: Client, account: ClusterAccount, owner: Any, other_user: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    lab = ClusterAccount(cluster=account.cluster, kind="service", label="NLP lab", username="nlplab")
    lab.save()
    lab.members.add(owner)
    page = owner_client.get("/launch/", {"model": "tiny-llama", "context": "1024"}).content.decode()
    assert "nlplab (NLP lab)" in page and 'name="account"' in page
    with django_capture_on_commit_callbacks(execute=False):
        owner_client.post("/launch/", {**LAUNCH, "account": str(lab.pk), "token": "a"})
    assert LLMSession.objects.get().account == lab
    mine = ClusterAccount(cluster=account.cluster, user=other_user, username="grace")
    mine.save()
    refused = owner_client.post("/launch/", {**LAUNCH, "account": str(mine.pk), "token": "b"})
    assert "That is not one of your accounts" in refused.content.decode()


def test_a_partition_that_takes_other_slurm_accounts_is_shown_but_not_launchable(
    owner_client: Client, account: ClusterAccount
) -> None:
    Partition.objects.filter(cluster__slug="local", name="gpu").update(allowed_accounts="physics,chem")
    choices = {"model": "tiny-llama", "quant": "fp16", "runtime": "llama.cpp", "context": "1024"}
    page = owner_client.get("/launch/", choices).content.decode()
    assert "gpu takes only the Slurm accounts physics, chem" in page
    refused = owner_client.post("/launch/", {**LAUNCH, "partition": "gpu"})
    assert "takes jobs of the Slurm accounts physics, chem only" in refused.content.decode()
    assert not LLMSession.objects.exists()
    account.slurm_account = "physics"
    account.save()
    assert "gpu takes only" not in owner_client.get("/launch/", choices).content.decode()


def test_the_wizards_queries_do_not_grow_with_the_catalog(
    owner_client: Client, account: ClusterAccount, django_assert_num_queries: Any
) -> None:
    """bench/wizard.py times the page on 100 models x 20 GPU options; here its query count is pinned: the same for
    the example catalog and for one with 12 more GPU types, their node groups, and 20 more models on the cluster."""
    wanted = {"model": "tiny-llama", "quant": "fp16", "runtime": "llama.cpp", "context": "2048"}
    with CaptureQueriesContext(connection) as example:
        assert owner_client.get("/launch/", wanted).status_code == 200
    local = Cluster.objects.get(slug="local")
    partition = Partition.objects.get(cluster=local, name="gpu")
    template = ModelCard.objects.get(name="tiny-llama")
    for i in range(12):
        gpu = GPUType.objects.create(name=f"extra-{i}", display_name=f"Extra {i}", memory_gib=16 + 8 * i)
        NodeGroup.objects.create(partition=partition, gpu_type=gpu, gpus_per_node=1 + i % 8, node_count=2,
                                 cpus_per_node=16, ram_gib=128)  # fmt: skip
    for i in range(20):
        card = ModelCard.objects.create(name=f"extra-model-{i}", family="llama",
                                        **{f: getattr(template, f) for f in architecture.FIELDS})  # fmt: skip
        variant = ModelVariant.objects.create(model=card, quantization="Q4_K_M", format="gguf", size_gib=4 + i)
        VariantLocation.objects.create(variant=variant, cluster=local, path=f"/models/extra-{i}.gguf")
    with django_assert_num_queries(len(example)):
        page = owner_client.get("/launch/", wanted)
    assert "extra-3" in page.content.decode()  # the new GPU types are among the options


def test_my_sessions_refreshes_every_second_while_one_is_starting(owner_client: Client, session: LLMSession) -> None:
    transition(session.pk, State.STARTING, cause="test")
    assert 'hx-trigger="every 1s"' in owner_client.get("/sessions/").content.decode()
    transition(session.pk, State.RUNNING, cause="test")
    assert 'hx-trigger="every 3s"' in owner_client.get("/sessions/").content.decode()
