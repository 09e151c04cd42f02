"""A batch run's results as the researcher downloads them, converted line by line as they stream from the cluster
(nothing is held whole). Plain Python.

The runner writes one record per request: `line`, `id`, `attempts`, `latency_s`, `error` and `response` (the server's
whole answer). Out of that:

- **jsonl**: `{"id", "line", "reply", "finish_reason", "prompt_tokens", "completion_tokens", "latency_s", "error"}`
  (`reply` is the text; for embeddings, the vector);
- **openai**: OpenAI's batch output (`id`, `custom_id`, `response` with `status_code` and `body`, `error`), what the
  `openai` client's `files.content` of an output file gives;
- **csv**: line, id, prompt (for plain-text input), reply, finish reason, tokens, latency, error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

FORMATS = ("jsonl", "openai", "csv")
CSV_COLUMNS = ("line", "id", "prompt", "reply", "finish_reason", "prompt_tokens", "completion_tokens", "latency_s",
               "error")  # fmt: skip


def lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Whole lines out of a byte stream (a torn last line is dropped: the runner writes whole lines)."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *whole, rest = rest.split(b"\n")
        yield from (line for line in whole if line.strip())


def reply_of(record: dict[str, Any]) -> tuple[Any, str]:
    """The answer's text (or vector) and finish reason."""
    response = record.get("response") or {}
    choices = response.get("choices") or [{}]
    first = choices[0] if isinstance(choices[0], dict) else {}
    if "message" in first:
        return (first.get("message") or {}).get("content"), str(first.get("finish_reason") or "")
    if "text" in first:
        return first.get("text"), str(first.get("finish_reason") or "")
    data = response.get("data") or [{}]
    return (data[0] if isinstance(data[0], dict) else {}).get("embedding"), ""


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    reply, finish = reply_of(record)
    usage = (record.get("response") or {}).get("usage") or {}
    return {
        "id": record.get("id"), "line": record.get("line"), "reply": reply, "finish_reason": finish or None,
        "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
        "latency_s": record.get("latency_s"), "error": record.get("error"),
    }  # fmt: skip


def _openai(record: dict[str, Any], run_id: str) -> dict[str, Any]:
    request_id = hashlib.sha256(f"{run_id}:{record.get('line')}".encode()).hexdigest()[:24]
    response = record.get("response")
    error = record.get("error")
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": record.get("id"),
        "response": None if response is None else {"status_code": 200, "request_id": request_id, "body": response},
        "error": None if error is None else {"code": "request_failed", "message": error},
    }


def convert(records: Iterable[bytes], fmt: str, run_id: str, prompts: Iterable[str] = ()) -> Iterator[bytes]:
    """The download, as bytes to stream. `prompts` (for csv) are the prompts in input order, beside the records."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; one of {', '.join(FORMATS)}")
    if fmt == "csv":
        yield from _csv(records, iter(prompts))
        return
    for raw in records:
        record = json.loads(raw)
        out = _openai(record, run_id) if fmt == "openai" else _plain(record)
        yield json.dumps(out, ensure_ascii=False).encode() + b"\n"


def _csv(records: Iterable[bytes], prompts: Iterator[str]) -> Iterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for raw in records:
        row = _plain(json.loads(raw))
        row["prompt"] = next(prompts, "")
        reply = row["reply"]
        row["reply"] = json.dumps(reply) if isinstance(reply, list) else reply
        writer.writerow([row.get(column) if row.get(column) is not None else "" for column in CSV_COLUMNS])
        yield buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()
    if buffer.getvalue():
        yield buffer.getvalue().encode()


def prompts_of(requests: Iterable[bytes]) -> Iterator[str]:
    """The last user message (or prompt) of each request line, for the csv's prompt column."""
    for raw in requests:
        body = json.loads(raw).get("body") or {}
        messages = body.get("messages") or []
        yield str(messages[-1].get("content", "")) if messages else str(body.get("prompt", body.get("input", "")))
