"""A batch run's prompts file: read, checked line by line, and written as the one form the runner reads.

Plain Python (no Django): the upload form, the OpenAI Files API and the command line call it. Three formats come in:

- **text**: one prompt per line (blank lines are not prompts);
- **jsonl**: one JSON object per line with `messages` (a chat) or `prompt` (a plain completion), an optional `id` and
  optional per-line sampling parameters;
- **openai**: OpenAI's batch input (`custom_id`, `method`, `url`, `body`), which the `openai` client uploads.

Whatever came in, out goes *requests JSONL*: one object per prompt, `{"line": N, "id": ..., "url": ..., "body": {...}}`,
with the file's system prompt and defaults applied and the body holding no `model` (the run names its server). Nothing
runs until the whole file has passed: a file with errors raises InputError listing them with their line numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

FORMATS = ("text", "jsonl", "openai")
# What a line may ask of the server besides its prompt: OpenAI's sampling parameters that llama-server, vLLM and
# transformers all take. Anything else is a mistake to report, not to pass on.
PARAMETERS = frozenset(
    {"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "presence_penalty",
     "frequency_penalty", "logit_bias", "response_format", "n"}
)  # fmt: skip
URLS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/embeddings": "input"}
ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})
MAX_ERRORS = 20  # reported at once; a file that is wrong on every line needs no thousand messages


class InputError(ValueError):
    """The file cannot run; `errors` holds (line number, message) pairs, the line 0 for the file as a whole."""

    def __init__(self, errors: list[tuple[int, str]], more: int = 0) -> None:
        self.errors = errors
        self.more = more
        lines = [f"line {n}: {m}" if n else m for n, m in errors]
        if more:
            lines.append(f"... and {more} more")
        super().__init__("; ".join(lines))


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 100 * 1024 * 1024
    max_line_bytes: int = 1024 * 1024
    max_prompts: int = 100_000


@dataclass(frozen=True)
class Options:
    """For the whole file: the system prompt (text and jsonl chats) and sampling defaults a line may override."""

    system_prompt: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    format: str = ""  # empty: detected from the first line


@dataclass(frozen=True)
class Summary:
    format: str
    prompts: int
    url: str  # the endpoint every request of the file goes to


def _lines(src: IO[bytes], limits: Limits) -> Iterator[tuple[int, bytes | None, str]]:
    """(line number, its bytes or None, an error) for each line; the file's size is checked as it is read."""
    total = 0
    number = 0
    while True:
        raw = src.readline(limits.max_line_bytes + 2)
        if not raw:
            return
        number += 1
        total += len(raw)
        if total > limits.max_bytes:
            yield number, None, f"the file is larger than the limit of {limits.max_bytes:,} bytes"
            return
        if len(raw) > limits.max_line_bytes + 1 or (len(raw) > limits.max_line_bytes and not raw.endswith(b"\n")):
            while raw and not raw.endswith(b"\n"):  # skip the rest of the long line
                raw = src.readline(1 << 20)
                total += len(raw)
            yield number, None, f"longer than the limit of {limits.max_line_bytes:,} bytes"
            continue
        yield number, raw, ""


def _text(raw: bytes) -> str:
    if b"\x00" in raw:
        raise ValueError("binary data (a NUL byte); the file must be text")
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start + 1})") from None


def _detect(first: str) -> str:
    if not first.lstrip().startswith("{"):
        return "text"
    try:
        obj = json.loads(first)
    except ValueError:
        return "jsonl"  # reported as invalid JSON on its line
    return "openai" if isinstance(obj, dict) and "custom_id" in obj else "jsonl"


def _parameters(obj: dict[str, Any], allowed_extra: frozenset[str]) -> None:
    unknown = sorted(set(obj) - PARAMETERS - allowed_extra)
    if unknown:
        raise ValueError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    if obj.get("stream"):
        raise ValueError("stream is not for batch runs")
    if "n" in obj and obj["n"] != 1:
        raise ValueError("n must be 1 (one reply per line)")


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list")
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            raise ValueError(f"message {i} needs a role ({', '.join(sorted(ROLES))}) and content")
    return value


def _with_system(messages: list[dict[str, Any]], system_prompt: str) -> list[dict[str, Any]]:
    if not system_prompt or messages[0].get("role") in ("system", "developer"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def json_object(text: str) -> dict[str, Any]:
    """A line as the JSON object it must be, or ValueError saying why not (a fine-tune run's data is read so too)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError("invalid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    return obj


def _parse_line(fmt: str, text: str, number: int, options: Options) -> tuple[str, str, dict[str, Any]]:
    """(id, url, body) of one line, or ValueError with what is wrong."""
    if fmt == "text":
        messages = _with_system([{"role": "user", "content": text}], options.system_prompt)
        return f"line-{number}", "/v1/chat/completions", {**options.defaults, "messages": messages}
    obj = json_object(text)
    if fmt == "openai":
        unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
        if unknown:
            raise ValueError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        custom_id, url, body = obj.get("custom_id"), obj.get("url"), obj.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            raise ValueError("custom_id must be a non-empty string")
        if obj.get("method", "POST") != "POST":
            raise ValueError("method must be POST")
        if url not in URLS:
            raise ValueError(f"url must be one of {', '.join(URLS)}")
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        key = URLS[url]
        if key not in body:
            raise ValueError(f"body needs {key} for {url}")
        _parameters(body, frozenset({key, "model"}))
        if key == "messages":
            _messages(body["messages"])
        body = {k: v for k, v in body.items() if k != "model"}
        return custom_id, url, {**options.defaults, **body}
    has_messages, has_prompt = "messages" in obj, "prompt" in obj
    if has_messages == has_prompt:
        raise ValueError("each line needs messages or prompt (one of them)")
    line_id = obj.get("id", f"line-{number}")
    if not isinstance(line_id, (str, int)) or isinstance(line_id, bool) or line_id == "":
        raise ValueError("id must be a non-empty string or a number")
    _parameters(obj, frozenset({"id", "messages", "prompt"}))
    params = {k: v for k, v in obj.items() if k in PARAMETERS}
    if has_messages:
        messages = _with_system(_messages(obj["messages"]), options.system_prompt)
        return str(line_id), "/v1/chat/completions", {**options.defaults, **params, "messages": messages}
    if not isinstance(obj["prompt"], str) or not obj["prompt"]:
        raise ValueError("prompt must be a non-empty string")
    return str(line_id), "/v1/completions", {**options.defaults, **params, "prompt": obj["prompt"]}


def normalize(src: IO[bytes], dst: IO[bytes], options: Options | None = None, limits: Limits | None = None) -> Summary:
    """Check every line of `src` and write its requests JSONL to `dst`; raise InputError, with line numbers, if any
    line is wrong (`dst` then holds a partial file, for the caller to discard)."""
    options = options or Options()
    limits = limits or Limits()
    if options.format and options.format not in FORMATS:
        raise InputError([(0, f"unknown format {options.format!r}; one of {', '.join(FORMATS)}")])
    try:
        _parameters(options.defaults, frozenset())
    except ValueError as exc:
        raise InputError([(0, f"defaults: {exc}")]) from None
    errors: list[tuple[int, str]] = []
    more = 0
    fmt = options.format
    seen: dict[str, int] = {}
    urls: set[str] = set()
    prompts = 0

    def error(number: int, message: str) -> None:
        nonlocal more
        if len(errors) < MAX_ERRORS:
            errors.append((number, message))
        else:
            more += 1

    for number, raw, problem in _lines(src, limits):
        if raw is None:
            error(number, problem)
            continue
        try:
            text = _text(raw)
        except ValueError as exc:
            error(number, str(exc))
            continue
        if not text.strip():
            continue
        fmt = fmt or _detect(text)
        try:
            line_id, url, body = _parse_line(fmt, text, number, options)
        except ValueError as exc:
            error(number, str(exc))
            continue
        if line_id in seen:
            error(number, f"id {line_id!r} is also on line {seen[line_id]}")
            continue
        seen[line_id] = number
        urls.add(url)
        prompts += 1
        if prompts > limits.max_prompts:
            error(number, f"more than {limits.max_prompts:,} prompts in one run")
            break
        if not errors:
            record = {"line": number, "id": line_id, "url": url, "body": body}
            dst.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
    if not errors and prompts == 0:
        errors.append((0, "the file holds no prompts"))
    if not errors and len(urls) > 1:
        errors.append((0, f"one run sends every line to one endpoint; this file mixes {', '.join(sorted(urls))}"))
    if errors:
        raise InputError(errors, more)
    return Summary(fmt, prompts, urls.pop())
