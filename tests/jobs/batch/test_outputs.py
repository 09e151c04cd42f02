"""A run's results as downloaded: the runner's records converted line by line to JSONL, OpenAI's batch output or CSV."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
from collections.abc import Iterator
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


def test_a_csv_cell_a_spreadsheet_would_run_is_defused_in_every_column() -> None:
    hostile = {**ANSWERED, "id": '=HYPERLINK("http://127.0.0.1/x","y")', "error": "@SUM(A1)", "latency_s": "-1+1",
               "response": {"choices": [{"message": {"content": "+cmd|' /C calc'!A0"}, "finish_reason": "\tstop"}],
                            "usage": {"prompt_tokens": "\r=1", "completion_tokens": 3}}}  # fmt: skip
    out = b"".join(outputs.convert(outputs.lines(chunks(hostile, ANSWERED)), "csv", "run", ["=1+1", "- a list"]))
    first, second = list(csv.reader(io.StringIO(out.decode(), newline="")))[1:]
    assert first == ["1", "'=HYPERLINK(\"http://127.0.0.1/x\",\"y\")", "'=1+1", "'+cmd|' /C calc'!A0", "'\tstop",
                     "'\r=1", "3", "'-1+1", "'@SUM(A1)"]  # fmt: skip
    assert second[:5] == ["1", "q1", "'- a list", "Paris", "stop"] and second[5:8] == ["12", "3", "0.25"]


def test_a_result_line_past_the_bound_is_never_held_and_stands_as_an_error_record() -> None:
    bound = 1 << 20
    head = b'{"line": 7, "id": "q7", "attempts": 1, "latency_s": 0.5, "error": null, "response": {"x": "'

    def stream() -> Iterator[bytes]:
        yield json.dumps(ANSWERED).encode() + b"\n" + head
        for _ in range(8 * bound // 65536):  # 8 MiB of one line, each piece a new object as the network's are
            yield b"y" * 65536
        yield b'"}}\n' + json.dumps(FAILED).encode() + b"\n"

    tracemalloc.start()
    try:
        out = b"".join(outputs.convert(outputs.lines(stream(), max_bytes=bound), "jsonl", "run"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * bound  # the 8 MiB line was never held: at most the bound and a piece
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["line"] for row in rows] == [1, 7, 3] and rows[1]["id"] == "q7" and rows[1]["reply"] is None
    assert rows[1]["error"] == "the result is longer than 1,048,576 bytes and was left out"


def test_the_bound_on_a_result_line_is_64_mib_and_a_line_at_it_is_kept() -> None:
    assert outputs.MAX_RECORD_BYTES == 64 << 20
    at_bound = json.dumps({**FAILED, "error": "x" * (4096 - len(json.dumps(FAILED)) + len("HTTP 400: too long"))})
    assert len(at_bound) == 4096
    assert list(outputs.lines([at_bound.encode() + b"\n"], max_bytes=4096)) == [at_bound.encode()]
    cut = list(outputs.lines([at_bound.encode() + b"x\n"], max_bytes=4096))
    assert json.loads(cut[0])["line"] == 3 and "longer than 4,096 bytes" in json.loads(cut[0])["error"]


def test_a_result_line_that_is_no_json_object_becomes_an_error_and_the_download_goes_on() -> None:
    stream = [b"not json\n", b"[1, 2]\n", b'{"line": 4, "response": {"choices": "x", "usage": [1]}}\n',
              json.dumps(ANSWERED).encode() + b"\n"]  # fmt: skip
    for fmt in outputs.FORMATS:
        out = b"".join(outputs.convert(outputs.lines(stream), fmt, "run"))
        assert out.count(b"the result is not a JSON object and was left out") == 2 and b"Paris" in out
