"""A fine-tune run's comparison, the plain part (docs/finetune.md, comparing): the validation data turned into prompts
with their reference answers, the adapter's requests, and the two runs' answers paired side by side. Plain Python.

- **Prompts from the validation data** (the run's checked `valid.jsonl`, jobs/finetune/data.py wrote it): a chat
  example is its messages without the final assistant turn (the reference answer), a prompt-completion example its
  prompt (the completion is the reference). Examples are taken in file order; the same file gives the same prompts
  and references, so the page finds a row's reference again by its index instead of keeping a copy.
- **The adapter's requests** are the base's, each body naming the adapter as the session's server knows it
  (adapter_fields); batchrun.py sends a body's own model and `lora` as they are.
- **Pairing**: the two runs' result records come from the cluster, where the session's owner can write anything in
  their place: each line is read bounded (jobs/batch/outputs.py), a record counts only for a line the page asked for,
  at most `max_records` are read, and each answer is cut to MAX_ANSWER_CHARS. What reaches the page is text, which
  its template escapes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from jobs.batch import outputs

CHAT, PROMPT_COMPLETION = "chat", "prompt-completion"  # jobs/finetune/data.py's formats
MAX_ANSWER_CHARS = 8000  # an answer on the page; the whole one is in the batch run's download
MAX_FIELD_CHARS = 200  # a finish reason or an error


@dataclass(frozen=True)
class Example:
    request: dict[str, Any]  # a jsonl prompts line (jobs/batch/inputs.py): messages or prompt
    reference: str


def _chat_example(obj: dict[str, Any]) -> Example | None:
    messages = obj.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        return None
    *prompt, last = messages
    if not isinstance(last, dict) or last.get("role") != "assistant" or not isinstance(last.get("content"), str):
        return None
    if not any(isinstance(m, dict) and m.get("role") == "user" for m in prompt):
        return None
    return Example({"messages": prompt}, last["content"])


def _completion_example(obj: dict[str, Any]) -> Example | None:
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if not isinstance(prompt, str) or not prompt or not isinstance(completion, str):
        return None
    return Example({"prompt": prompt}, completion)


def examples(src: IO[bytes], data_format: str, limit: int) -> Iterator[Example]:
    """The validation examples as prompts and reference answers, in file order, at most `limit`; an example with
    nothing to ask (a chat of the assistant's turn alone) is left out."""
    make = _chat_example if data_format == CHAT else _completion_example
    taken = 0
    while taken < limit and (raw := src.readline()):
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        example = make(obj) if isinstance(obj, dict) else None
        if example is not None:
            taken += 1
            yield example


def validation_prompts(src: IO[bytes], dst: IO[bytes], data_format: str, limit: int) -> int:
    """Write the validation examples' prompts as a jsonl prompts file (ids `example-N`); how many."""
    count = 0
    for count, example in enumerate(examples(src, data_format, limit), 1):
        dst.write(json.dumps({"id": f"example-{count}", **example.request}, ensure_ascii=False).encode() + b"\n")
    return count


def adapter_fields(runtime: str, loaded: Sequence[str], run_id: str, served_name: str) -> dict[str, Any]:
    """What a request names to reach a run's adapter on a session's server, as the proxy does (jobs/use/targets.py,
    by_adapter): vLLM's LoRA module is the run's uuid; llama-server takes its adapters in the session's order (by
    run uuid, jobs/sessions/lifecycle.py) as ids, the one asked for at scale 1 and the others, unlisted, at 0."""
    if runtime == "vllm":
        return {"model": run_id}
    return {"model": served_name, "lora": [{"id": list(loaded).index(run_id), "scale": 1.0}]}


def adapter_requests(src: IO[bytes], dst: IO[bytes], fields: dict[str, Any]) -> None:
    """The base run's requests JSONL with `fields` in each body: the adapter run's."""
    while raw := src.readline():
        record = json.loads(raw)
        record["body"] = {**record["body"], **fields}
        dst.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str = ""
    error: str = ""
    completion_tokens: int | None = None
    cut: bool = False  # longer than MAX_ANSWER_CHARS: the rest is in the download


@dataclass(frozen=True)
class Row:
    line: int
    prompt: str
    reference: str | None
    base: Answer | None  # None: not answered (yet)
    adapter: Answer | None

    @property
    def answers(self) -> tuple[Answer | None, Answer | None]:
        return self.base, self.adapter


def _cut(value: Any, limit: int) -> tuple[str, bool]:
    text = value if isinstance(value, str) else ""
    return (text[:limit], True) if len(text) > limit else (text, False)


def answer_of(record: dict[str, Any]) -> Answer:
    """A result record as the page shows it: text only, each part bounded."""
    reply, finish = outputs.reply_of(record)
    text, cut = _cut(reply, MAX_ANSWER_CHARS)
    usage = record.get("response")
    usage = usage.get("usage") if isinstance(usage, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    error = record.get("error")
    return Answer(
        text=text,
        finish_reason=_cut(finish, 40)[0],
        error=_cut(error, MAX_FIELD_CHARS)[0] if error is not None else "",
        completion_tokens=tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0 else None,
        cut=cut,
    )


def answers(records: Iterable[bytes], wanted: set[int], max_records: int) -> dict[int, Answer]:
    """The answers to the wanted lines among at most `max_records` records (the first for a line counts); reading
    stops once every wanted line has one."""
    found: dict[int, Answer] = {}
    for count, raw in enumerate(records, 1):
        record = outputs.record_of(raw)
        line = record.get("line")
        if isinstance(line, int) and not isinstance(line, bool) and line in wanted and line not in found:
            found[line] = answer_of(record)
            if len(found) == len(wanted):
                break
        if count >= max_records:
            break
    return found


def prompt_text(body: dict[str, Any]) -> str:
    """What a request asked, for the page: a chat's last user message (the system prompt and earlier turns are in the
    prompts file), or the prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        text = users[-1] if users else ""
        return _cut(text if isinstance(text, str) else json.dumps(text), MAX_ANSWER_CHARS)[0]
    return _cut(body.get("prompt"), MAX_ANSWER_CHARS)[0]


def requests_page(requests: Iterable[bytes], start: int, count: int) -> list[tuple[int, int, str]]:
    """(index, line, prompt) of the requests at indexes start to start + count (the portal's own requests file)."""
    page = []
    for index, raw in enumerate(requests):
        if index >= start + count:
            break
        if index >= start:
            record = json.loads(raw)
            page.append((index, int(record["line"]), prompt_text(record["body"])))
    return page


def pair(
    page: list[tuple[int, int, str]],
    base: dict[int, Answer],
    adapter: dict[int, Answer],
    references: Sequence[str] | None,
) -> list[Row]:
    """The side-by-side rows of a page: each prompt with both answers (by the request's line) and, for validation
    data, the reference answers of the page's examples, in its order (examples() made the prompts in that order)."""
    rows = []
    for position, (_index, line, prompt) in enumerate(page):
        reference = None
        if references is not None and position < len(references):
            reference = _cut(references[position], MAX_ANSWER_CHARS)[0]
        rows.append(Row(line, prompt, reference, base.get(line), adapter.get(line)))
    return rows
