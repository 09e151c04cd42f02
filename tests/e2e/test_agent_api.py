"""The routes coding agents speak, end to end on the local cluster, through the portal as uvicorn serves it, asked
with the official `anthropic` and `openai` clients as Claude Code and Codex CLI are pointed at it (docs/chat.md):

- SmolLM2-135M-Instruct in llama-server answers Anthropic's Messages API (plain, streamed, with tools, count_tokens)
  and OpenAI's Responses API (plain, streamed) by its catalog name, and chat completions with tools; a wrong token is
  a 401 and another user's session a 404 in Anthropic's shape; the usage rows carry the server's token counts. vLLM
  (its CPU build) answers Messages and Responses too.
- SmolLM2-135M does not call tools (its template declares none), so a stand-in that does, speaking llama-server's
  protocol (tool_model_server.py), runs as the session's llama.cpp binary: its tool calls come back in OpenAI's and
  Anthropic's shapes, streamed and not, and a tool's result goes back to it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from django.db.models import QuerySet

from jobs.cluster import backend
from jobs.models import ApiToken, LLMSession, ProxyRequest
from portal import ssh
from tests.e2e.sessions import cancel_all_jobs
from tests.e2e.test_real_model import QUESTION, launch_smollm2

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER: Any = {"name": "get_weather", "description": "The current weather in a city", "input_schema": CITY}
FUNCTION: Any = {"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                                  "parameters": WEATHER["input_schema"]}}  # fmt: skip


def clients(portal: str, token: str) -> tuple[anthropic.Anthropic, openai.OpenAI]:
    """The two clients as researchers' tools set them: ANTHROPIC_BASE_URL=PORTAL/api, OPENAI_BASE_URL=PORTAL/api/v1."""
    return (anthropic.Anthropic(base_url=f"{portal}/api", api_key=token, max_retries=0, timeout=180),
            openai.OpenAI(base_url=f"{portal}/api/v1", api_key=token, max_retries=0, timeout=180))  # fmt: skip


def recorded(rows: QuerySet[ProxyRequest], n: int) -> bool:
    """Whether `n` usage rows are there within 10 s: the portal writes a row after its reply's last byte, off the event
    loop, so the last of them may land just after the client has read its reply."""
    deadline = time.monotonic() + 10
    while rows.count() < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return rows.count() == n


def text_of(message: anthropic.types.Message) -> str:
    return "".join(getattr(block, "text", "") for block in message.content)


@pytest.fixture(params=["llama.cpp", "vllm"])
def smol(
    request: pytest.FixtureRequest, local_catalog: dict[str, Any], smollm2_hf: str, owner: Any,
    django_capture_on_commit_callbacks: Any,
) -> Iterator[LLMSession]:  # fmt: skip
    quant = {"llama.cpp": "Q4_1", "vllm": "bf16"}[request.param]
    yield launch_smollm2(owner, django_capture_on_commit_callbacks, local_catalog, runtime=request.param, quant=quant,
                         alias="smol")  # fmt: skip
    cancel_all_jobs()
    ssh.pool.close_all()
    backend.close_forwards()


def test_smollm2_answers_the_messages_and_responses_apis_by_its_catalog_name(
    portal_server: str, smol: LLMSession, owner: Any, other_user: Any, smollm2_hf: str
) -> None:
    runtime = smol.runtime.kind
    claude, sdk = clients(portal_server, ApiToken.issue(owner, "agent")[1])
    greedy: Any = {"temperature": 0}  # this SDK names no temperature; the server reads it from the body
    asked = claude.messages.create(model=smollm2_hf, max_tokens=40, messages=QUESTION, extra_body=greedy)
    assert "Paris" in text_of(asked), (runtime, asked)
    with claude.messages.stream(model=smollm2_hf, max_tokens=40, messages=QUESTION, extra_body=greedy) as stream:
        streamed = "".join(stream.text_stream)
    assert "Paris" in streamed, runtime
    assert claude.messages.count_tokens(model=smollm2_hf, messages=QUESTION).input_tokens > 5

    answered = sdk.responses.create(model=smollm2_hf, input=QUESTION[0]["content"], max_output_tokens=40,
                                    temperature=0)  # fmt: skip
    assert "Paris" in answered.output_text, (runtime, answered)
    events = sdk.responses.create(model="smol", input=QUESTION[0]["content"], max_output_tokens=40, temperature=0,
                                  stream=True)  # fmt: skip
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert "Paris" in deltas, runtime

    # The usage rows carry the server's own counts, streamed or not.
    rows = ProxyRequest.objects.filter(session=smol, user=owner, status=200)
    for endpoint in ("messages", "responses"):
        counted = rows.filter(endpoint=endpoint)
        assert recorded(counted, 2), (runtime, endpoint)
        for row in counted:
            assert row.tokens_reported and row.prompt_tokens > 5 and row.completion_tokens > 0, (runtime, endpoint)

    with pytest.raises(anthropic.AuthenticationError) as wrong:
        clients(portal_server, "hpcllm_not-a-token")[0].messages.create(
            model=smollm2_hf, max_tokens=8, messages=QUESTION
        )
    assert wrong.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as someone_elses:
        clients(portal_server, ApiToken.issue(other_user, "agent")[1])[0].messages.create(
            model=str(smol.pk), max_tokens=8, messages=QUESTION
        )
    assert someone_elses.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_llama_server_answers_requests_that_offer_tools(
    portal_server: str, local_catalog: dict[str, Any], smollm2_hf: str, owner: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    """SmolLM2 calls no tool, but a request offering tools is answered (llama-server runs with --jinja), in both
    APIs: what a coding agent sends on every turn."""
    launch_smollm2(owner, django_capture_on_commit_callbacks, local_catalog, alias="smol")
    try:
        claude, sdk = clients(portal_server, ApiToken.issue(owner, "agent")[1])
        message = claude.messages.create(model="smol", max_tokens=24, messages=QUESTION, tools=[WEATHER])
        assert message.stop_reason in ("end_turn", "tool_use", "max_tokens") and message.content
        chat = sdk.chat.completions.create(model="smol", max_tokens=24, messages=QUESTION, tools=[FUNCTION])
        assert chat.choices[0].finish_reason in ("stop", "tool_calls", "length")
    finally:
        cancel_all_jobs()
        ssh.pool.close_all()


def test_tool_calls_come_back_in_both_shapes_and_a_tool_result_goes_back(
    portal_server: str, tool_caller: LLMSession, owner: Any
) -> None:
    claude, sdk = clients(portal_server, ApiToken.issue(owner, "agent")[1])
    asked: Any = [{"role": "user", "content": "What is the weather in Paris?"}]

    # OpenAI's shape, not streamed, then streamed; then the tool's result goes back.
    whole = sdk.chat.completions.create(model="caller", messages=asked, tools=[FUNCTION])
    (call,) = whole.choices[0].message.tool_calls or []
    assert whole.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})  # type: ignore[union-attr]
    arguments, name = "", ""
    for chunk in sdk.chat.completions.create(model="caller", messages=asked, tools=[FUNCTION], stream=True):
        for piece in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name += (piece.function.name or "") if piece.function else ""
            arguments += (piece.function.arguments or "") if piece.function else ""
    assert (name, json.loads(arguments)) == ("get_weather", {"city": "Paris"})
    turns = [*asked, whole.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]  # fmt: skip
    after = sdk.chat.completions.create(model="caller", messages=turns, tools=[FUNCTION])
    assert after.choices[0].message.content == "The tool says: sunny, 21 C"

    # Anthropic's shape, not streamed, then streamed; then the tool's result goes back.
    message = claude.messages.create(model="caller", max_tokens=64, messages=asked, tools=[WEATHER])
    (use,) = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use" and (use.name, use.input) == ("get_weather", {"city": "Paris"})
    with claude.messages.stream(model="caller", max_tokens=64, messages=asked, tools=[WEATHER]) as stream:
        final = stream.get_final_message()
    (streamed_use,) = [block for block in final.content if block.type == "tool_use"]
    assert final.stop_reason == "tool_use" and streamed_use.input == {"city": "Paris"}
    result: Any = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}
    turns = [*asked, {"role": "assistant", "content": message.content}, result]
    replied = claude.messages.create(model="caller", max_tokens=64, tools=[WEATHER], messages=turns)
    assert text_of(replied) == "The tool says: sunny"

    rows = ProxyRequest.objects.filter(session=tool_caller, user=owner)
    assert recorded(rows.filter(endpoint="messages", prompt_tokens=17, completion_tokens=5), 3)
    assert recorded(rows.filter(endpoint="chat/completions", prompt_tokens=17, completion_tokens=5), 3)
