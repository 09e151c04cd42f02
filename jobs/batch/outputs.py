"""A batch run's results as the researcher downloads them, converted line by line as they stream from the cluster
(nothing is held whole). Plain Python.

The runner writes one record per request: `line`, `id`, `attempts`, `latency_s`, `error` and `response` (the server's
whole answer). Out of that:

- **jsonl**: `{"id", "line", "reply", "finish_reason", "prompt_tokens", "completion_tokens", "latency_s", "error"}`
  (`reply` is the text; for embeddings, the vector);
- **openai**: OpenAI's batch output (`id`, `custom_id`, `response` with `status_code` and `body`, `error`), what the
  `openai` client's `files.content` of an output file gives;
- **csv**: line, id, prompt (for plain-text input), reply, finish reason, tokens, latency, error; a cell a spreadsheet
  would run as a formula is defused (portal/csvsafe.py, as the usage tables' CSV).

The records come from the cluster, where the session's owner can write anything in their place: a line longer than
MAX_RECORD_BYTES is never held whole (what is past the bound is dropped as it streams by) and, like a line that is not
a JSON object, becomes a record whose error says so.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from portal.csvsafe import safe_cell

FORMATS = ("jsonl", "openai", "csv")
CSV_COLUMNS = ("line", "id", "prompt", "reply", "finish_reason", "prompt_tokens", "completion_tokens", "latency_s",
               "error")  # fmt: skip


# A record holds the server's whole answer: a long reply or a large embedding is a few MiB at most. Beyond this bound a
# line is no answer the portal's runner wrote, and holding it would let a session's owner fill the portal's memory.
MAX_RECORD_BYTES = 64 << 20
# How much of a line cut at the bound is kept: the runner's records start `{"line": N, "id": "..."`, so the error
# record can say which request it was (its id too, unless that is longer than this).
HEAD_BYTES = 4096
_HEAD = re.compile(rb'^\{"line": (\d{1,9}), "id": ')


def lines(chunks: Iterable[bytes], max_bytes: int | None = None) -> Iterator[bytes]:
    """Whole lines out of a byte stream, each at most `max_bytes` (MAX_RECORD_BYTES); a longer one is dropped as it
    arrives and stands as a record saying so (too_long). A torn last line is dropped: the runner writes whole lines."""
    max_bytes = MAX_RECORD_BYTES if max_bytes is None else max_bytes
    held: list[bytes] = []  # the pieces of the line being read
    held_bytes = 0
    head = b""  # the first bytes of a line past the bound, once it is (held is then empty)
    for chunk in chunks:
        start = 0
        while start <= len(chunk):
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not head and held_bytes + len(piece) > max_bytes:
                head = _head([*held, piece])
                held, held_bytes = [], 0
            elif not head:
                held.append(piece)
                held_bytes += len(piece)
            if end < 0:
                break
            if head:
                yield too_long(head, max_bytes)
            elif (line := b"".join(held)).strip():
                yield line
            held, held_bytes, head = [], 0, b""
            start = end + 1


def _head(pieces: list[bytes]) -> bytes:
    """The first HEAD_BYTES of a line, from its pieces (without joining what the bound refused to hold)."""
    head = b""
    for piece in pieces:
        head += piece[: HEAD_BYTES - len(head)]
        if len(head) >= HEAD_BYTES:
            break
    return head


def too_long(head: bytes, max_bytes: int) -> bytes:
    """The record standing for a line past the bound: its line and id where the line starts as the runner's do."""
    record: dict[str, Any] = {"line": None, "id": None, "attempts": None, "latency_s": None, "response": None,
                              "error": f"the result is longer than {max_bytes:,} bytes and was left out"}  # fmt: skip
    if found := _HEAD.match(head):
        record["line"] = int(found[1])
        with contextlib.suppress(ValueError):  # an id cut by HEAD_BYTES, or no JSON at all
            named, _ = json.JSONDecoder().raw_decode(head[found.end() :].decode(errors="replace"))
            record["id"] = named if isinstance(named, str) else None
    return json.dumps(record).encode()


def record_of(raw: bytes) -> dict[str, Any]:
    """A result line as a record; one that is not a JSON object (whatever wrote it) becomes a record saying so."""
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return {"line": None, "id": None, "error": "the result is not a JSON object and was left out"}
    return record


def _mapping(value: Any) -> dict[str, Any]:
    """A record's part that should be a JSON object, or an empty one (the server and the file are the owner's)."""
    return value if isinstance(value, dict) else {}


def _first(value: Any) -> dict[str, Any]:
    return _mapping(value[0]) if isinstance(value, list) and value else {}


def reply_of(record: dict[str, Any]) -> tuple[Any, str]:
    """The answer's text (or vector) and finish reason."""
    response = _mapping(record.get("response"))
    first = _first(response.get("choices"))
    if "message" in first:
        return _mapping(first.get("message")).get("content"), str(first.get("finish_reason") or "")
    if "text" in first:
        return first.get("text"), str(first.get("finish_reason") or "")
    return _first(response.get("data")).get("embedding"), ""


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    reply, finish = reply_of(record)
    usage = _mapping(_mapping(record.get("response")).get("usage"))
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
        record = record_of(raw)
        out = _openai(record, run_id) if fmt == "openai" else _plain(record)
        yield json.dumps(out, ensure_ascii=False).encode() + b"\n"


def _csv(records: Iterable[bytes], prompts: Iterator[str]) -> Iterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for raw in records:
        row = _plain(record_of(raw))
        row["prompt"] = next(prompts, "")
        reply = row["reply"]
        row["reply"] = json.dumps(reply) if isinstance(reply, list) else reply
        writer.writerow([safe_cell(row[column]) if row.get(column) is not None else "" for column in CSV_COLUMNS])
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
