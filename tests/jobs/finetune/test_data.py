"""Training data is checked line by line before anything runs, with the line of every problem."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.batch.inputs import InputError, Limits
from jobs.finetune import data
from tests.jobs.finetune.conftest import chat_lines


def check(content: bytes, fmt: str = "", limits: Limits | None = None) -> tuple[data.Summary, list[dict[str, Any]]]:
    out = io.BytesIO()
    summary = data.check(io.BytesIO(content), out, limits or Limits(), fmt)
    return summary, [json.loads(line) for line in out.getvalue().splitlines()]


def errors(content: bytes, fmt: str = "", limits: Limits | None = None) -> list[tuple[int, str]]:
    with pytest.raises(InputError) as caught:
        check(content, fmt, limits)
    return caught.value.errors


def test_a_chat_file_in_openais_format_is_read_and_its_checksum_is_of_what_the_trainer_reads() -> None:
    line = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello.", "weight": 1}]}  # fmt: skip
    summary, examples = check(json.dumps(line).encode() + b"\n\n" + chat_lines(2))
    assert (summary.format, summary.examples) == ("chat", 3)
    assert examples[0]["messages"][2] == {"role": "assistant", "content": "Hello."}  # the weight of 1 is the default
    written = b"".join(json.dumps(e).encode() + b"\n" for e in examples)
    assert summary.sha256 == data.sha256_of(io.BytesIO(written))


def test_a_prompt_completion_file_is_read() -> None:
    summary, examples = check(b'{"prompt": "2+2=", "completion": "4"}\n{"prompt": "3+3=", "completion": "6"}\n')
    assert (summary.format, summary.examples) == ("prompt-completion", 2)
    assert examples[1] == {"prompt": "3+3=", "completion": "6"}


def test_every_bad_line_is_reported_with_its_number() -> None:
    content = b"\n".join(
        [
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
            b"not json",
            b'{"messages": [{"role": "user", "content": "q"}]}',
            b'{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
            b'{"prompt": "p", "completion": "c"}',
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}',
            b'{"messages": [], "extra": 1}',
            b"\xff\xfe",
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": []}',
        ]
    )
    found = dict(errors(content))
    assert sorted(found) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert "invalid JSON" in found[2]
    assert "last message must be the assistant's" in found[3]
    assert "role" in found[4]
    assert "one format per file" in found[5]
    assert "weight 0 is not supported" in found[6]
    assert "unknown field extra" in found[7]
    assert "UTF-8" in found[8]
    assert "tool definitions" in found[9]


def test_limits_hold_and_an_empty_file_is_refused() -> None:
    assert errors(chat_lines(5), limits=Limits(max_prompts=3)) == [(4, "more than 3 examples in one file")]
    assert "larger than the limit" in errors(chat_lines(50), limits=Limits(max_bytes=1024))[-1][1]
    assert errors(b"\n\n") == [(0, "the file holds no examples")]
    assert errors(b"{}", fmt="csv") == [(0, "unknown format 'csv'; one of chat, prompt-completion")]


def test_a_split_is_the_same_for_the_same_seed_and_leaves_examples_to_train_on() -> None:
    lines = chat_lines(10)

    def split(seed: int, fraction: float) -> tuple[bytes, bytes, int]:
        train, valid = io.BytesIO(), io.BytesIO()
        held = data.split(io.BytesIO(lines), train, valid, 10, fraction, seed)
        return train.getvalue(), valid.getvalue(), held

    assert split(1, 0.2) == split(1, 0.2)
    train, valid, held = split(1, 0.2)
    assert held == 2 and valid.count(b"\n") == 2 and train.count(b"\n") == 8
    assert split(1, 0.01)[2] == 1 and split(1, 0.99)[2] == 9


def test_the_planned_steps_are_every_epochs_examples_in_steps() -> None:
    assert data.planned_steps(10, 4, 3) == 9  # 3 steps an epoch, the last one short
    assert data.planned_steps(8, 4, 1) == 2
    assert data.planned_steps(1, 16, 2) == 2


@given(st.binary(max_size=300))
def test_any_bytes_are_either_examples_or_refused_with_line_numbers(content: bytes) -> None:
    try:
        summary, examples = check(content)
    except InputError as exc:
        assert all(isinstance(n, int) and n >= 0 and m for n, m in exc.errors)
    else:
        assert summary.examples == len(examples) > 0
