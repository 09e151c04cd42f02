"""A fine-tune run's training data: read and checked line by line as a batch run's prompts file is (jobs/batch/inputs.py
reads the lines: the sizes, UTF-8, line numbers), and written as the one form the trainer reads. Plain Python.

Two formats come in, one per file (detected from the first line unless named):

- **chat**: `{"messages": [...]}`, OpenAI's fine-tuning format: roles system, user and assistant, text content, the
  last message the assistant's (the answer trained on); an assistant message's `weight` may be 1 (0, leaving it out
  of the loss, is not supported: TRL trains on every assistant message);
- **prompt-completion**: `{"prompt": "...", "completion": "..."}`.

Out goes the same JSONL with nothing else on a line, which TRL's SFTTrainer reads as a conversational or a
prompt-completion dataset. Nothing runs until the whole file has passed: a file with errors raises
jobs.batch.inputs.InputError listing them with their line numbers.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from jobs.batch.inputs import MAX_ERRORS, InputError, Limits, _lines, _text, json_object

CHAT, PROMPT_COMPLETION = "chat", "prompt-completion"
FORMATS = (CHAT, PROMPT_COMPLETION)
ROLES = frozenset({"system", "user", "assistant"})
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight"})


@dataclass(frozen=True)
class Summary:
    format: str
    examples: int
    sha256: str  # of what was written: the file the trainer reads


def _detect(obj: dict[str, Any]) -> str:
    return CHAT if "messages" in obj else PROMPT_COMPLETION


def _detected(text: str) -> str:
    """The format a line is in; "" when it is not a JSON object (its own error says so)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return ""
    return _detect(obj) if isinstance(obj, dict) else ""


def _unknown(obj: dict[str, Any], allowed: frozenset[str], what: str = "field") -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ValueError(f"unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")


def _chat(obj: dict[str, Any]) -> dict[str, Any]:
    if "tools" in obj or "functions" in obj:
        raise ValueError("tool definitions are not supported in training data yet")
    _unknown(obj, frozenset({"messages"}))
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be an object")
        if "tool_calls" in message or "function_call" in message:
            raise ValueError(f"message {i}: tool calls are not supported in training data yet")
        _unknown(message, MESSAGE_KEYS, f"key in message {i}:")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} needs a role: {', '.join(sorted(ROLES))}")
        if not isinstance(content, str) or (role == "assistant" and not content.strip()):
            raise ValueError(f"message {i} needs its content as text" + (", not empty" if role == "assistant" else ""))
        if "weight" in message and (message["weight"] not in (0, 1) or isinstance(message["weight"], bool)):
            raise ValueError(f"message {i}: weight must be 0 or 1")
        if message.get("weight") == 0:
            raise ValueError(f"message {i}: weight 0 is not supported (every assistant message is trained on)")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's: the answer to learn")
    return {"messages": out}


def _prompt_completion(obj: dict[str, Any]) -> dict[str, Any]:
    _unknown(obj, frozenset({"prompt", "completion"}))
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    if not isinstance(completion, str) or not completion.strip():
        raise ValueError("completion must be a non-empty string")
    return {"prompt": prompt, "completion": completion}


def _example(fmt: str, text: str) -> dict[str, Any]:
    """One line as the trainer reads it, or ValueError with what is wrong."""
    obj = json_object(text)
    if ("messages" in obj) == ("prompt" in obj or "completion" in obj):
        raise ValueError("each line needs messages, or prompt and completion (not both)")
    if _detect(obj) != fmt:
        raise ValueError(f"a {_detect(obj)} example in a {fmt} file: one format per file")
    return _chat(obj) if fmt == CHAT else _prompt_completion(obj)


def check(src: IO[bytes], dst: IO[bytes], limits: Limits, fmt: str = "") -> Summary:
    """Check every line of `src` and write the examples to `dst`; raise InputError, with line numbers, if any line is
    wrong (`dst` then holds a partial file, for the caller to discard). `limits.max_prompts` counts examples."""
    if fmt and fmt not in FORMATS:
        raise InputError([(0, f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")])
    errors: list[tuple[int, str]] = []
    more = examples = 0
    digest = hashlib.sha256()
    for number, raw, problem in _lines(src, limits):
        try:
            if raw is None:
                raise ValueError(problem)
            text = _text(raw)
            if not text.strip():
                continue
            fmt = fmt or _detected(text)  # the first line that says which format it is decides
            example = _example(fmt or CHAT, text)
        except ValueError as exc:
            if len(errors) < MAX_ERRORS:
                errors.append((number, str(exc)))
            else:
                more += 1
            continue
        examples += 1
        if examples > limits.max_prompts:
            errors.append((number, f"more than {limits.max_prompts:,} examples in one file"))
            break
        if not errors:
            line = json.dumps(example, ensure_ascii=False).encode() + b"\n"
            digest.update(line)
            dst.write(line)
    if not errors and examples == 0:
        errors.append((0, "the file holds no examples"))
    if errors:
        raise InputError(errors, more)
    return Summary(fmt, examples, digest.hexdigest())


def _records(src: IO[bytes]) -> Iterator[bytes]:
    while line := src.readline():
        yield line


def split(src: IO[bytes], train: IO[bytes], valid: IO[bytes], examples: int, fraction: float, seed: int) -> int:
    """Split a checked file into training and validation examples: round(examples x fraction) of them, at least one
    and leaving at least one to train on, chosen by the run's seed (the same file and seed, the same split). Returns
    how many went to validation."""
    if not 0 < fraction < 1 or examples < 2:
        raise ValueError("a split needs a fraction between 0 and 1 and at least two examples")
    count = min(examples - 1, max(1, round(examples * fraction)))
    chosen = set(random.Random(seed).sample(range(examples), count))
    for index, line in enumerate(_records(src)):
        (valid if index in chosen else train).write(line)
    return count


def planned_steps(examples: int, per_step: int, epochs: int) -> int:
    """Optimizer steps the run trains: each epoch's examples in steps of `per_step` (the last one may be short), as
    many epochs as asked. The trainer is given this as its max_steps, so a requeued run ends at the same step."""
    return max(1, epochs * -(-examples // max(1, per_step)))


def sha256_of(src: IO[bytes]) -> str:
    digest = hashlib.sha256()
    for line in _records(src):
        digest.update(line)
    return digest.hexdigest()
