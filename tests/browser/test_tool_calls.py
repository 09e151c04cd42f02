"""The chat's tool-call blocks in Chromium, without a cluster: the browser itself stands in for the model server
(Playwright answers the page's request to the session's chat/completions with a stream), so what is checked is the
page's script: the streamed pieces gathered by index, each call a collapsed block whose hostile name and arguments
stay text, nothing run or sent back by itself, the calls kept and shown again after a reload, and sent back in
OpenAI's shape with the next question."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from django.urls import reverse
from playwright.sync_api import Browser, Dialog, Page, Route, expect

from catalog.models import Cluster, ClusterAccount, GPUType, ModelVariant, Partition, Runtime
from jobs.models import Conversation, LLMSession, State
from tests.conftest import REPO
from tests.e2e.test_worker import worker_env
from tests.worker import PortalServer

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
ARTIFACTS = REPO / "var" / "test-artifacts" / "browser"
PASSWORD = "correct horse battery"  # tests/conftest.py's users
HOSTILE_NAME = '<img src=x onerror="alert(1)">'
ARGUMENT_PIECES = ['{"query": "<script>alert(2)', '</script>", ', '"n": 3}']


@pytest.fixture(scope="module")
def portal(django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """uvicorn on the test database; no worker, no cluster: nothing here reaches one."""
    with django_db_blocker.unblock():
        env = worker_env()
    server = PortalServer(env, tmp_path_factory.mktemp("portal") / "uvicorn.log")
    yield server.start()
    server.stop()


@pytest.fixture
def conversation(account: ClusterAccount, owner: Any) -> Conversation:
    """A chat on a running session of ada's (its server's address is never used: the browser answers for it)."""
    local = Cluster.objects.get(slug="local")
    session = LLMSession.objects.create(
        owner=owner, account=account, state=State.RUNNING, cluster=local,
        partition=Partition.objects.get(cluster=local, name="gpu"), gpu_type=GPUType.objects.get(name="a100-80g"),
        variant=ModelVariant.objects.filter(model__name="tiny-llama")[0],
        runtime=Runtime.objects.get(kind="llama.cpp"), gpus_per_node=1, cpus_per_node=4, memory_gib=16,
        context_length=1024, job_id="4242", node_list="gpu-a100-01", host="127.0.0.1", port=9,
    )  # fmt: skip
    return Conversation.objects.create(session=session, owner=owner)


def events(*chunks: dict[str, Any]) -> str:
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"


def delta(**fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": fields, "finish_reason": None}]}


# As llama-server and vLLM stream a reply that calls two tools: the id and name once, the arguments in pieces.
TOOL_CALL_STREAM = events(
    delta(role="assistant", content=None, tool_calls=[
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": HOSTILE_NAME, "arguments": ""}}]),
    *[delta(tool_calls=[{"index": 0, "function": {"arguments": piece}}]) for piece in ARGUMENT_PIECES],
    delta(tool_calls=[{"index": 1, "id": "call_2", "type": "function",
                       "function": {"name": "search", "arguments": "not JSON <b>"}}]),
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 30}},
)  # fmt: skip
TEXT_STREAM = events(delta(role="assistant", content="No tools were run."), {"choices": [], "usage": None})
CALLS = [
    {"id": "call_1", "type": "function", "function": {"name": HOSTILE_NAME, "arguments": "".join(ARGUMENT_PIECES)}},
    {"id": "call_2", "type": "function", "function": {"name": "search", "arguments": "not JSON <b>"}},
]


def check_blocks(page: Page) -> None:
    blocks = page.locator("#messages > li.msg-assistant details.tool-call")
    expect(blocks).to_have_count(2)
    expect(blocks.locator("summary")).to_have_text([f"Tool call: {HOSTILE_NAME}", "Tool call: search"])
    assert blocks.evaluate_all("blocks => blocks.map(b => b.open)") == [False, False]  # collapsed
    blocks.first.locator("summary").click()
    expect(blocks.first.locator("pre")).to_be_visible()
    pretty = json.dumps(json.loads("".join(ARGUMENT_PIECES)), indent=2)
    assert blocks.locator("pre").all_text_contents() == [pretty, "not JSON <b>"]  # not JSON: as the model wrote it
    assert page.locator("#messages img, #messages script, #messages b").count() == 0  # text, never markup


def test_a_models_tool_calls_show_as_collapsed_blocks_and_go_back_in_openai_shape(
    browser: Browser, portal: str, conversation: Conversation
) -> None:
    asked: list[dict[str, Any]] = []
    dialogs: list[str] = []

    def dismissed(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    def model(route: Route) -> None:
        asked.append(route.request.post_data_json or {})
        body = TOOL_CALL_STREAM if len(asked) == 1 else TEXT_STREAM
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    context = browser.new_context(base_url=portal)
    page = context.new_page()
    page.on("dialog", dismissed)
    page.goto(reverse("login"))
    page.get_by_label("Username").fill("ada")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out ada")).to_be_visible()
    page.route("**/v1/chat/completions", model)
    page.goto(f"{reverse('jobs:chat', args=[conversation.session_id])}?c={conversation.pk}")

    page.get_by_label("Message").fill("Find the weather in Paris")
    page.get_by_role("button", name="Send", exact=True).click()
    reply = page.locator("#messages > li.msg-assistant").last
    expect(reply).to_have_attribute("data-id", re.compile(r"^\d+$"))  # saved
    expect(reply.locator(".stats")).to_contain_text("30 tokens")
    check_blocks(page)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-tool-calls.png"), full_page=True)
    assert len(asked) == 1  # nothing was run or sent back by itself
    assert conversation.messages.last().tool_calls == CALLS  # type: ignore[union-attr]

    page.reload()  # now from the server's template
    check_blocks(page)

    page.get_by_label("Message").fill("Thanks")
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.locator("#messages > li.msg-assistant").last).to_contain_text("No tools were run.")
    assert asked[1]["messages"] == [
        {"role": "user", "content": "Find the weather in Paris"},
        {"role": "assistant", "content": None, "tool_calls": CALLS},
        {"role": "user", "content": "Thanks"},
    ]
    assert dialogs == []
    context.close()
