"""What a Meter reads from a relayed reply: tokens from the server's usage, from llama-server's timings, or counted
from the stream; time to first byte; and the row it makes."""

from __future__ import annotations

import json
import uuid
from typing import Any

from catalog.runtime_rules import API_ROUTES
from jobs.usage.records import KEPT_BYTES, WHOLE_JSON_BYTES, Meter


def event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def delta(text: str | None, finish: str | None = None) -> dict[str, Any]:
    content = {} if text is None else {"content": text}
    return {"choices": [{"index": 0, "delta": content, "finish_reason": finish}]}


def named_event(name: str, payload: dict[str, Any]) -> bytes:
    """An event as Anthropic's Messages API and OpenAI's Responses API stream them: named."""
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()


def metered(
    chunks: list[bytes], content_type: str = "text/event-stream", status: int = 200, endpoint: str = "chat/completions"
) -> Any:
    tokens = API_ROUTES[endpoint].tokens
    meter = Meter(str(uuid.uuid4()), 1, "api", endpoint, bytes_in=10, tokens=tokens)
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


def test_llama_servers_timings_count_the_prompts_cached_tokens_in_it() -> None:
    """prompt_n is what it computed; cache_n what it found in its cache: the prompt is both."""
    last = {**delta(None, "stop"), "timings": {"cache_n": 6, "prompt_n": 3, "predicted_n": 4}}
    row = metered([event(delta("x")), event(last), b"data: [DONE]\n\n"])
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (9, 6, 4)


def test_openais_cached_tokens_are_kept_with_the_prompt() -> None:
    usage = {"prompt_tokens": 20, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 16}}
    row = metered([json.dumps({"choices": [], "usage": usage}).encode()], "application/json")
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (20, 16, 2)


def test_an_anthropic_message_counts_its_cache_reads_in_the_prompt() -> None:
    """llama-server's /v1/messages: input_tokens leaves out the prompt's cached tokens (cache_read_input_tokens)."""
    message = {"type": "message", "content": [{"type": "text", "text": "Paris"}],
               "usage": {"cache_read_input_tokens": 4, "input_tokens": 7, "output_tokens": 2}}  # fmt: skip
    row = metered([json.dumps(message).encode()], "application/json", endpoint="messages")
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens, row.tokens_reported) == (11, 4, 2, True)


def test_an_anthropic_stream_takes_the_prompt_from_its_start_and_the_output_from_its_last_delta() -> None:
    start = {"type": "message_start", "message": {"id": "m", "content": [], "usage": {
        "cache_read_input_tokens": 0, "input_tokens": 12, "output_tokens": 0}}}  # fmt: skip
    text = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Par"}}
    chunks = [named_event("message_start", start)]
    # Long enough that the start is no longer in the kept tail, as in a long answer.
    chunks += [named_event("content_block_delta", text)] * (2 * KEPT_BYTES // len(chunks[0]))
    chunks += [named_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                             "usage": {"output_tokens": 57}}),
               named_event("message_stop", {"type": "message_stop"})]  # fmt: skip
    row = metered(chunks, endpoint="messages")
    assert (row.prompt_tokens, row.completion_tokens, row.tokens_reported) == (12, 57, True)


def test_vllms_anthropic_stream_says_both_in_its_last_delta() -> None:
    final = {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
             "usage": {"input_tokens": 9, "output_tokens": 5}}  # fmt: skip
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 1, "output_tokens": 0}}}
    row = metered([named_event("message_start", start), named_event("message_delta", final)], endpoint="messages")
    assert (row.prompt_tokens, row.completion_tokens) == (9, 5)


def test_a_responses_stream_is_counted_from_its_completed_event() -> None:
    usage = {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 8}, "output_tokens": 6,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 36}  # fmt: skip
    created = {"type": "response.created", "response": {"id": "r", "status": "in_progress", "usage": None}}
    done = {"type": "response.completed", "response": {"id": "r", "status": "completed", "output": [], "usage": usage}}
    row = metered([named_event("response.created", created), named_event("response.output_text.delta",
                   {"type": "response.output_text.delta", "delta": "Paris"}), named_event("response.completed", done)],
                  endpoint="responses")  # fmt: skip
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens, row.tokens_reported) == (30, 8, 6, True)


def test_a_count_of_tokens_uses_none() -> None:
    row = metered([b'{"input_tokens": 40}'], "application/json", endpoint="messages/count_tokens")
    assert (row.prompt_tokens, row.completion_tokens, row.tokens_reported) == (0, 0, True)
    row = metered([b'{"tokens": [1, 2, 3]}'], "application/json", endpoint="tokenize")
    assert (row.prompt_tokens, row.completion_tokens, row.tokens_reported) == (0, 0, True)


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
