"""What a Meter reads from a relayed reply: tokens from the server's usage, from llama-server's timings, or counted
from the stream; time to first byte; and the row it makes."""

from __future__ import annotations

import json
import uuid
from typing import Any

from jobs.usage.records import WHOLE_JSON_BYTES, Meter


def event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def delta(text: str | None, finish: str | None = None) -> dict[str, Any]:
    content = {} if text is None else {"content": text}
    return {"choices": [{"index": 0, "delta": content, "finish_reason": finish}]}


def metered(chunks: list[bytes], content_type: str = "text/event-stream", status: int = 200) -> Any:
    meter = Meter(str(uuid.uuid4()), 1, "api", "chat/completions", bytes_in=10)
    meter.begin(status, content_type)
    for chunk in chunks:
        meter.feed(chunk)
    return meter.finish()


def test_a_replys_own_usage_is_taken_with_its_nested_details() -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 7, "completion_tokens_details": {"reasoning_tokens": 0}}
    row = metered([json.dumps({"choices": [], "usage": usage}).encode()], "application/json")
    assert (row.prompt_tokens, row.completion_tokens, row.tokens_reported) == (11, 7, True)
    assert row.ttft_ms is None and row.duration_ms >= 0 and row.bytes_in == 10


def test_a_streams_usage_event_wins_over_counting() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
    row = metered(
        [event(delta("a")), event(delta("b")) + event(delta(None, "stop")), event(usage), b"data: [DONE]\n\n"]
    )
    assert (row.prompt_tokens, row.completion_tokens, row.tokens_reported) == (5, 3, True)
    assert row.ttft_ms is not None and row.ttft_ms <= row.duration_ms


def test_llama_servers_timings_give_the_tokens_of_a_stream_without_usage() -> None:
    last = {**delta(None, "stop"), "timings": {"prompt_n": 9, "predicted_n": 4, "predicted_per_second": 50.0}}
    row = metered([event(delta("x")), event(last), b"data: [DONE]\n\n"])
    assert (row.prompt_tokens, row.completion_tokens, row.tokens_reported) == (9, 4, True)


def test_without_either_a_streams_tokens_are_counted_one_per_event_with_text() -> None:
    chunks = [event({"choices": [{"delta": {"role": "assistant", "content": ""}}]})]
    chunks += [event(delta(w)) for w in ("The", " cat", " sat")] + [event(delta(None, "stop")), b"data: [DONE]\n\n"]
    row = metered([b"".join(chunks[:2]), *chunks[2:]])  # as the relay joins what arrives together
    assert (row.prompt_tokens, row.completion_tokens, row.tokens_reported) == (0, 3, False)
    assert row.tokens_per_s is not None and row.tokens_per_s > 0


def test_an_error_reply_counts_no_tokens_and_keeps_its_status() -> None:
    row = metered([b'{"error": {"message": "nope"}, "usage": {"completion_tokens": 99}}'], "application/json", 400)
    assert (row.status, row.completion_tokens) == (400, 0) and row.failed


def test_the_portals_own_answer_is_recorded_with_its_status() -> None:
    meter = Meter(str(uuid.uuid4()), 1, "chat", "chat/completions")
    row = meter.finish(409)
    assert row is not None and row.status == 409 and row.bytes_out == 0
    assert meter.finish(409) is None  # once


def test_a_huge_json_reply_still_yields_the_usage_at_its_end() -> None:
    filler = (
        b'{"data": [' + b"0.1," * (WHOLE_JSON_BYTES // 4) + b'0.1], "usage": {"prompt_tokens": 42, "total_tokens": 42}}'
    )
    pieces = [filler[i : i + 65536] for i in range(0, len(filler), 65536)]
    row = metered(pieces, "application/json")
    assert (row.prompt_tokens, row.completion_tokens, row.bytes_out) == (42, 0, len(filler))
