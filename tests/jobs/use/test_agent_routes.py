"""The routes coding agents speak (catalog.runtime_rules.API_ROUTES beyond OpenAI's first four): Anthropic's Messages
API, OpenAI's Responses API, token counts, rerank and tokenize, through the same door as chat. Asked with the official
`anthropic` and `openai` clients where they have the call, over the ASGI application as uvicorn serves it; the
session's server is a stand-in speaking llama-server's protocol (what its /v1/messages and /v1/responses answer, tool
calls included, as read from its code: docs/chat.md)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from django.test import override_settings

from catalog.models import Runtime
from catalog.runtime_rules import ANTHROPIC, API_ROUTES, RUNTIMES
from jobs.models import LLMSession, SessionShare
from tests.asgi import HOST, Portal, bearer, browser, run, sdk_client
from tests.jobs.use.upstream import Sent, Server, recorded, token_of

pytestmark = pytest.mark.django_db(transaction=True)

QUESTION: Any = [{"role": "user", "content": "What is the capital of France?"}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER: Any = {"name": "get_weather", "description": "The weather in a city", "input_schema": CITY}
MESSAGE: Any = {"id": "msg_1", "type": "message", "role": "assistant", "model": "tiny-Q4_K_M",
                "stop_reason": "end_turn", "stop_sequence": None, "content": [{"type": "text", "text": "Paris."}],
                "usage": {"cache_read_input_tokens": 2, "input_tokens": 9, "output_tokens": 3}}  # fmt: skip
TOOL_USE: Any = {**MESSAGE, "stop_reason": "tool_use", "content": [
    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]}  # fmt: skip


def sse(*events: dict[str, Any], named: bool = True) -> bytes:
    return b"".join(
        (f"event: {e['type']}\n" if named else "").encode() + f"data: {json.dumps(e)}\n\n".encode() for e in events
    )


def message_stream(*blocks: dict[str, Any]) -> bytes:
    """Anthropic's stream of a message with these content blocks, as llama-server sends it."""
    usage = {"cache_read_input_tokens": 0, "input_tokens": 11, "output_tokens": 0}
    started = {**MESSAGE, "content": [], "stop_reason": None, "usage": usage}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": started}]
    for index, block in enumerate(blocks):
        if block["type"] == "text":
            events += [{"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
                       {"type": "content_block_delta", "index": index,
                        "delta": {"type": "text_delta", "text": block["text"]}}]  # fmt: skip
        else:
            events += [{"type": "content_block_start", "index": index,
                        "content_block": {**block, "input": {}}},
                       {"type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}}]  # fmt: skip
        events.append({"type": "content_block_stop", "index": index})
    stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
    events += [{"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": 4}}, {"type": "message_stop"}]  # fmt: skip
    return sse(*events)


def answer(server: Server, body: bytes, content_type: str = "application/json", status: int = 200) -> None:
    server.answer = lambda request: httpx.Response(status, headers={"content-type": content_type}, stream=Sent(body))


def anthropic_client(token: str) -> anthropic.AsyncAnthropic:
    """Anthropic's SDK as Claude Code's settings point it at the portal: ANTHROPIC_BASE_URL=https://PORTAL/api."""
    return anthropic.AsyncAnthropic(
        base_url=f"http://{HOST}/api", api_key=token, http_client=sdk_client(), max_retries=0
    )


def openai_client(token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{HOST}/api/v1", api_key=token, http_client=sdk_client(), max_retries=0)


def test_anthropics_sdk_reaches_the_session_by_catalog_name_with_the_token_in_x_api_key(
    server: Server, running: LLMSession, owner: Any
) -> None:
    claude = anthropic_client(token_of(owner))
    answer(server, json.dumps(MESSAGE).encode())
    name = running.variant.model.name

    async def ask() -> anthropic.types.Message:
        return await claude.messages.create(model=name, max_tokens=32, messages=QUESTION)

    reply = run(ask())
    assert reply.content[0].type == "text" and getattr(reply.content[0], "text", None) == "Paris."
    (sent,) = server.got
    assert sent.url.path == "/v1/messages" and sent.url.query == b""
    assert sent.headers["authorization"] == f"Bearer {running.api_key}" and "x-api-key" not in sent.headers
    assert sent.headers["anthropic-version"] == claude.default_headers["anthropic-version"]  # forwarded
    assert json.loads(sent.content)["model"] == running.served_model_name
    row = recorded(session=running, user=owner)
    assert (row.endpoint, row.prompt_tokens, row.cached_tokens, row.completion_tokens) == ("messages", 11, 2, 3)


def test_a_streamed_message_and_its_tool_use_come_back_through_the_sdk(
    server: Server, running: LLMSession, owner: Any
) -> None:
    claude = anthropic_client(token_of(owner))
    answer(server, message_stream({"type": "text", "text": "Let me look."}, TOOL_USE["content"][0]),
           "text/event-stream")  # fmt: skip

    async def ask() -> anthropic.types.Message:
        async with claude.messages.stream(
            model="tiny", max_tokens=64, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER]
        ) as stream:
            return await stream.get_final_message()

    final = run(ask())
    assert final.stop_reason == "tool_use"
    tool = final.content[1]
    assert tool.type == "tool_use" and (tool.name, tool.input) == ("get_weather", {"city": "Paris"})
    assert json.loads(server.got[0].content)["tools"][0]["name"] == "get_weather"  # the tools went to the server
    row = recorded(session=running, user=owner)
    assert (row.prompt_tokens, row.completion_tokens, row.tokens_reported) == (11, 4, True)
    assert row.ttft_ms is not None


def test_a_tool_result_goes_back_to_the_server_as_the_client_sent_it(
    server: Server, running: LLMSession, owner: Any
) -> None:
    claude = anthropic_client(token_of(owner))
    answer(server, json.dumps(MESSAGE).encode())
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}
    asked = {"role": "user", "content": "Weather in Paris?"}
    turns: Any = [asked, {"role": "assistant", "content": TOOL_USE["content"]}, {"role": "user", "content": [result]}]

    async def ask() -> anthropic.types.Message:
        return await claude.messages.create(model="tiny", max_tokens=32, messages=turns, tools=[WEATHER])

    assert getattr(run(ask()).content[0], "text", None) == "Paris."
    assert json.loads(server.got[0].content)["messages"] == turns


def test_count_tokens_answers_and_uses_no_tokens(server: Server, running: LLMSession, owner: Any) -> None:
    claude = anthropic_client(token_of(owner))
    answer(server, b'{"input_tokens": 14}')

    async def count() -> int:
        counted = await claude.messages.count_tokens(model="tiny", messages=QUESTION)
        return counted.input_tokens

    assert run(count()) == 14 and server.got[0].url.path == "/v1/messages/count_tokens"
    row = recorded(session=running, user=owner)
    assert (row.endpoint, row.prompt_tokens, row.completion_tokens, row.tokens_reported) == (
        "messages/count_tokens", 0, 0, True)  # fmt: skip


def test_a_wrong_token_is_refused_in_anthropics_shape_before_the_body_is_read(
    server: Server, running: LLMSession
) -> None:
    claude = anthropic_client("hpcllm_not-a-token")

    async def ask() -> None:
        await claude.messages.create(model="tiny", max_tokens=8, messages=QUESTION)

    with pytest.raises(anthropic.AuthenticationError) as refused:
        run(ask())
    assert refused.value.status_code == 401
    body = refused.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert server.got == []
    # The OpenAI routes keep OpenAI's shape.
    reply = Portal(bearer("hpcllm_not-a-token")).post("/api/v1/chat/completions", json={})
    assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"


def test_another_users_session_is_not_found_in_anthropics_shape(
    server: Server, running: LLMSession, other_user: Any
) -> None:
    claude = anthropic_client(token_of(other_user))

    async def ask() -> None:
        await claude.messages.create(model=str(running.pk), max_tokens=8, messages=QUESTION)

    with pytest.raises(anthropic.NotFoundError) as refused:
        run(ask())
    assert refused.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert server.got == []


def test_a_grantee_reaches_a_shared_session_as_owner_slash_alias_only_with_an_api_grant(
    server: Server, running: LLMSession, owner: Any, other_user: Any
) -> None:
    answer(server, json.dumps(MESSAGE).encode())
    grant = SessionShare.objects.create(session=running, created_by=owner, user=other_user, chat=True, api=False)
    api = Portal({"x-api-key": token_of(other_user), "anthropic-version": "2023-06-01"})
    body = {"model": "ada/tiny", "max_tokens": 8, "messages": QUESTION}
    assert api.post("/api/v1/messages", json=body).status_code == 404
    SessionShare.objects.filter(pk=grant.pk).update(api=True)
    assert api.post("/api/v1/messages", json=body).status_code == 200
    assert len(server.got) == 1


def test_a_body_over_the_limit_is_refused_in_anthropics_shape(running: LLMSession, owner: Any) -> None:
    with override_settings(PORTAL_MAX_REQUEST_BYTES=1000):
        reply = Portal({"x-api-key": token_of(owner)}).post("/api/v1/messages", content=b"x" * 5000)
    assert reply.status_code == 413 and reply.json()["error"]["type"] == "request_too_large"


def test_openais_sdk_creates_responses_plain_and_streamed(server: Server, running: LLMSession, owner: Any) -> None:
    sdk = openai_client(token_of(owner))
    usage = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 14}  # fmt: skip
    response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "tiny",
                "output": [{"type": "message", "id": "m1", "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": "Paris.", "annotations": []}]}],
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": usage}  # fmt: skip
    answer(server, json.dumps(response).encode())

    async def ask() -> str:
        return (await sdk.responses.create(model="tiny", input="Capital of France?")).output_text

    assert run(ask()) == "Paris." and server.got[-1].url.path == "/v1/responses"
    assert (recorded(session=running, user=owner).prompt_tokens, recorded(session=running).completion_tokens) == (12, 2)

    events = [{"type": "response.created", "sequence_number": 0, "response": {**response, "status": "in_progress",
                                                                             "output": [], "usage": None}},
              {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "m1", "output_index": 0,
               "content_index": 0, "delta": "Paris.", "logprobs": []},
              {"type": "response.completed", "sequence_number": 2, "response": response}]  # fmt: skip
    answer(server, sse(*events), "text/event-stream")

    async def stream() -> list[str]:
        got = []
        async with await sdk.responses.create(model="tiny", input="Capital of France?", stream=True) as replies:
            async for event in replies:
                if event.type == "response.output_text.delta":
                    got.append(event.delta)
        return got

    assert run(stream()) == ["Paris."]


def test_a_chat_completion_with_tools_relays_the_tool_call_streamed_and_not(
    server: Server, running: LLMSession, owner: Any
) -> None:
    sdk = openai_client(token_of(owner))
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    whole = {"id": "c", "object": "chat.completion", "created": 1, "model": "tiny", "choices": [
        {"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None,
                                                               "tool_calls": [call]}}]}  # fmt: skip
    answer(server, json.dumps(whole).encode())
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"]}}]

    async def ask() -> Any:
        return await sdk.chat.completions.create(
            model="tiny",
            messages=QUESTION,
            tools=tools,
        )

    (got,) = run(ask()).choices[0].message.tool_calls
    assert (got.function.name, json.loads(got.function.arguments)) == ("get_weather", {"city": "Paris"})

    pieces = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
              {"index": 0, "function": {"arguments": '{"city":'}},
              {"index": 0, "function": {"arguments": '"Paris"}'}}]  # fmt: skip
    chunks = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
               "choices": [{"index": 0, "delta": {"tool_calls": [piece]}, "finish_reason": None}]}
              for piece in pieces]  # fmt: skip
    chunks.append({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})  # fmt: skip
    answer(server, sse(*chunks, named=False) + b"data: [DONE]\n\n", "text/event-stream")

    async def stream() -> str:
        arguments = ""
        replies = await sdk.chat.completions.create(
            model="tiny",
            messages=QUESTION,
            tools=tools,
            stream=True,
        )
        async for chunk in replies:
            for piece in chunk.choices[0].delta.tool_calls or []:
                arguments += piece.function.arguments or "" if piece.function else ""
        return arguments

    assert json.loads(run(stream())) == {"city": "Paris"}


@pytest.mark.parametrize("name", [name for name, route in API_ROUTES.items() if "POST" in route.methods])
def test_each_route_reaches_its_own_path_on_the_server(
    name: str, server: Server, running: LLMSession, owner: Any
) -> None:
    answer(server, b"{}")
    reply = Portal(bearer(token_of(owner))).post(f"/api/v1/{name}", json={"model": "tiny", "content": "x"})
    assert reply.status_code == 200, reply.text
    assert server.got[-1].url.path == API_ROUTES[name].upstream
    assert json.loads(server.got[-1].content)["model"] == running.served_model_name


def test_a_route_the_sessions_runtime_lacks_is_refused_naming_the_runtimes_that_serve_it(
    server: Server, running: LLMSession, owner: Any
) -> None:
    lacking = next(kind for kind, rules in RUNTIMES.items() if "messages" not in rules.routes)
    LLMSession.objects.filter(pk=running.pk).update(runtime=Runtime.objects.get(kind=lacking))
    reply = Portal({"x-api-key": token_of(owner)}).post("/api/v1/messages", json={"model": "tiny", "messages": []})
    assert reply.status_code == 404 and reply.json()["type"] == "error"
    error = reply.json()["error"]
    assert error["type"] == "not_found_error" and error["code"] == "route_not_served"
    assert RUNTIMES[lacking].label in error["message"] and "llama.cpp" in error["message"]
    assert server.got == []
    assert recorded(session=running, user=owner).status == 404


def test_the_browsers_route_answers_in_the_routes_own_shape(server: Server, running: LLMSession, owner: Any) -> None:
    answer(server, json.dumps(MESSAGE).encode())
    page = Portal(browser(owner))
    assert page.post(f"/sessions/{running.pk}/v1/messages", json={"messages": QUESTION}).json() == MESSAGE
    assert server.got[0].url.path == "/v1/messages"
    refused = page.get(f"/sessions/{running.pk}/v1/messages")
    assert refused.status_code == 405 and refused.json()["error"]["type"] == "invalid_request_error"
    assert API_ROUTES["messages"].api == ANTHROPIC and refused.json()["type"] == "error"


def test_a_stream_that_breaks_ends_with_an_error_event_in_the_routes_shape(
    server: Server, running: LLMSession, owner: Any
) -> None:
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield message_stream({"type": "text", "text": "Par"})[:200]
            raise httpx.ReadError("the node went away")

    server.answer = lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Broken())
    reply = Portal({"x-api-key": token_of(owner)}).post("/api/v1/messages", json={"model": "tiny", "stream": True})
    last = reply.text.rstrip("\n").split("\n\n")[-1]
    assert last.startswith("event: error\ndata: ")
    error = json.loads(last.partition("data: ")[2])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
