#!/usr/bin/env python3
"""A model server that calls tools, run by a session's job in place of llama-server (tests/e2e/test_agent_api.py).

SmolLM2-135M, the real model of the e2e tests, does not call tools (its chat template declares none), so the relay of
tool calls is proven with this stand-in speaking llama-server's protocol as its code does (llama-cpp-python 0.3.36's
llama.cpp): /health, and with the session's key (Authorization: Bearer, from --api-key-file) /v1/models,
/v1/chat/completions and /v1/messages, streamed and not. Given tools, it calls the first with {"city": "Paris"}; given a
tool's result, it answers with that result in words. Takes llama-server's --host, --port, --api-key-file and -a and
ignores the rest. Python standard library only: a compute node needs nothing else."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ARGS = sys.argv[1:]
HOST, PORT = ARGS[ARGS.index("--host") + 1], int(ARGS[ARGS.index("--port") + 1])
with open(ARGS[ARGS.index("--api-key-file") + 1]) as key_file:
    KEY = key_file.read().strip()
NAME = ARGS[ARGS.index("-a") + 1] if "-a" in ARGS else "stand-in"
ARGUMENTS = {"city": "Paris"}
PROMPT_TOKENS, OUTPUT_TOKENS = 17, 5


def _chat_answer(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The text, or the tool calls, this server answers a chat request with."""
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        return f"The tool says: {last.get('content')}", []
    tools = body.get("tools") or []
    if tools:
        name = tools[0]["function"]["name"]
        return "", [
            {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(ARGUMENTS)}}
        ]
    return "No tools were offered.", []


def _message_answer(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The same for Anthropic's Messages API."""
    messages = body.get("messages") or []
    content = messages[-1].get("content") if messages else ""
    results = (
        [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
        if isinstance(content, list)
        else []
    )
    if results:
        return f"The tool says: {results[-1].get('content')}", []
    tools = body.get("tools") or []
    if tools:
        return "", [{"type": "tool_use", "id": "toolu_1", "name": tools[0]["name"], "input": ARGUMENTS}]
    return "No tools were offered.", []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _events(self, events: list[tuple[str | None, Any]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for name, data in events:
            text = data if isinstance(data, str) else json.dumps(data)
            self.wfile.write(((f"event: {name}\n" if name else "") + f"data: {text}\n\n").encode())
            self.wfile.flush()
        self.close_connection = True

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif not self._keyed():
            pass
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": NAME, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": "not found", "type": "not_found_error"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if not self._keyed():
            return
        if self.path == "/v1/chat/completions":
            self._chat(body)
        elif self.path == "/v1/messages":
            self._message(body)
        else:
            self._send(404, {"error": {"message": "not found", "type": "not_found_error"}})

    def _keyed(self) -> bool:
        if self.headers.get("Authorization", "") == f"Bearer {KEY}":
            return True
        self._send(401, {"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}})
        return False

    def _chat(self, body: dict[str, Any]) -> None:
        text, calls = _chat_answer(body)
        finish = "tool_calls" if calls else "stop"
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": OUTPUT_TOKENS,
                 "total_tokens": PROMPT_TOKENS + OUTPUT_TOKENS}  # fmt: skip
        if not body.get("stream"):
            message = {"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}
            choice = {"index": 0, "message": message, "finish_reason": finish}
            self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": NAME,
                             "choices": [choice], "usage": usage})  # fmt: skip
            return

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": NAME,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}  # fmt: skip

        events: list[tuple[str | None, Any]] = [(None, chunk({"role": "assistant", "content": None}))]
        for index, call in enumerate(calls):  # as llama-server streams a call: its name first, then its arguments
            head = {"index": index, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""}}  # fmt: skip
            events.append((None, chunk({"tool_calls": [head]})))
            arguments = call["function"]["arguments"]
            for piece in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2 :]):
                events.append((None, chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})))
        if text:
            events.append((None, chunk({"content": text})))
        last = chunk({}, finish)
        last["timings"] = {"prompt_n": PROMPT_TOKENS, "predicted_n": OUTPUT_TOKENS}
        events += [(None, last), (None, "[DONE]")]
        self._events(events)

    def _message(self, body: dict[str, Any]) -> None:
        text, uses = _message_answer(body)
        blocks = ([{"type": "text", "text": text}] if text else []) + uses
        stop = "tool_use" if uses else "end_turn"
        usage = {"cache_read_input_tokens": 0, "input_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS}
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": NAME, "content": blocks,
                   "stop_reason": stop, "stop_sequence": None, "usage": usage}  # fmt: skip
        if not body.get("stream"):
            self._send(200, message)
            return
        events: list[tuple[str | None, Any]] = [("message_start", {"type": "message_start", "message": {
            **message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 0}}})]  # fmt: skip
        for index, block in enumerate(blocks):
            start: dict[str, Any]
            delta: dict[str, Any]
            if block["type"] == "text":
                start, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}
            else:
                start = {**block, "input": {}}
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            events += [("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}),
                       ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}),
                       ("content_block_stop", {"type": "content_block_stop", "index": index})]  # fmt: skip
        events += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                      "usage": {"output_tokens": OUTPUT_TOKENS}}),
                   ("message_stop", {"type": "message_stop"})]  # fmt: skip
        self._events(events)

    def log_message(self, *args: object) -> None:
        pass


ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
