"""A run's results as downloaded: the runner's records converted line by line to JSONL, OpenAI's batch output or CSV."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest

from jobs.batch import outputs

ANSWERED = {"line": 1, "id": "q1", "attempts": 1, "latency_s": 0.25, "error": None, "response": {
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3}}}  # fmt: skip
FAILED = {"line": 3, "id": "q3", "attempts": 1, "latency_s": 0.01, "error": "HTTP 400: too long", "response": None}
EMBEDDED = {"line": 2, "id": "q2", "attempts": 1, "latency_s": 0.1, "error": None,
            "response": {"data": [{"embedding": [0.5, -0.5]}], "usage": {"prompt_tokens": 4}}}  # fmt: skip


def chunks(*records: dict[str, Any]) -> list[bytes]:
    """The records as bytes cut in awkward places, as a stream from the cluster comes."""
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    return [data[i : i + 7] for i in range(0, len(data), 7)]


def test_jsonl_has_the_reply_the_finish_reason_tokens_latency_and_error_of_each_line() -> None:
    out = b"".join(outputs.convert(outputs.lines(chunks(ANSWERED, EMBEDDED, FAILED)), "jsonl", "run"))
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0] == {"id": "q1", "line": 1, "reply": "Paris", "finish_reason": "stop", "prompt_tokens": 12,
                       "completion_tokens": 3, "latency_s": 0.25, "error": None}  # fmt: skip
    assert rows[1]["reply"] == [0.5, -0.5] and rows[1]["finish_reason"] is None
    assert rows[2]["reply"] is None and rows[2]["error"] == "HTTP 400: too long"


def test_openai_output_has_custom_ids_status_codes_and_errors_in_openais_shape() -> None:
    out = b"".join(outputs.convert(outputs.lines(chunks(ANSWERED, FAILED)), "openai", "run-1"))
    first, failed = (json.loads(line) for line in out.splitlines())
    assert first["custom_id"] == "q1" and first["id"].startswith("batch_req_") and first["error"] is None
    assert first["response"]["status_code"] == 200 and first["response"]["body"] == ANSWERED["response"]
    assert failed["response"] is None and failed["error"] == {"code": "request_failed", "message": "HTTP 400: too long"}


def test_csv_puts_each_prompt_beside_its_answer() -> None:
    out = b"".join(outputs.convert(outputs.lines(chunks(ANSWERED, FAILED)), "csv", "run", ["capital?", "too long"]))
    rows = list(csv.reader(io.StringIO(out.decode())))
    assert rows[0] == list(outputs.CSV_COLUMNS)
    assert rows[1][:5] == ["1", "q1", "capital?", "Paris", "stop"] and rows[2][-1] == "HTTP 400: too long"


def test_an_unknown_format_is_refused_and_a_torn_last_line_is_dropped() -> None:
    with pytest.raises(ValueError, match="unknown output format"):
        list(outputs.convert([], "xml", "run"))
    assert list(outputs.lines([b'{"a": 1}\n{"b"'])) == [b'{"a": 1}']
