"""A batch run's prompts file: each format in, requests JSONL out, and every kind of bad file refused with line
numbers before anything runs."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.batch.inputs import InputError, Limits, Options, normalize


def run(data: bytes, **options: Any) -> tuple[str, list[dict[str, Any]]]:
    limits = options.pop("limits", None)
    out = io.BytesIO()
    summary = normalize(io.BytesIO(data), out, Options(**options), limits)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert summary.prompts == len(records)
    return summary.format, records


def refused(data: bytes, **options: Any) -> list[tuple[int, str]]:
    with pytest.raises(InputError) as caught:
        run(data, **options)
    return caught.value.errors


def test_plain_text_is_one_chat_prompt_per_line_with_the_files_system_prompt_and_defaults() -> None:
    fmt, records = run(b"What is 2+2?\n\nName a colour.\r\n", system_prompt="Be brief.", defaults={"max_tokens": 8})
    assert fmt == "text"
    assert [(r["line"], r["id"], r["url"]) for r in records] == [
        (1, "line-1", "/v1/chat/completions"), (3, "line-3", "/v1/chat/completions"),
    ]  # fmt: skip
    assert records[1]["body"] == {
        "max_tokens": 8,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    }


def test_jsonl_lines_carry_their_own_ids_and_parameters_over_the_defaults() -> None:
    data = b"\n".join([
        json.dumps({"id": "q1", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}).encode(),
        json.dumps({"messages": [{"role": "system", "content": "Own"}, {"role": "user", "content": "Yo"}]}).encode(),
    ])  # fmt: skip
    fmt, records = run(data, system_prompt="Default system", defaults={"temperature": 0.7, "max_tokens": 5})
    assert fmt == "jsonl"
    assert records[0]["id"] == "q1" and records[0]["body"]["temperature"] == 0
    assert records[0]["body"]["messages"][0] == {"role": "system", "content": "Default system"}
    assert records[1]["id"] == "line-2" and records[1]["body"]["messages"][0]["content"] == "Own"  # its own wins
    assert records[1]["body"]["temperature"] == 0.7


def test_openai_batch_input_keeps_custom_ids_and_drops_the_model() -> None:
    line = {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}}  # fmt: skip
    fmt, records = run(json.dumps(line).encode() + b"\n")
    assert fmt == "openai"
    assert records == [{"line": 1, "id": "req-1", "url": "/v1/chat/completions",
                        "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}}]  # fmt: skip


def test_a_completion_prompt_goes_to_the_completions_endpoint() -> None:
    _, records = run(b'{"prompt": "Once upon a time", "max_tokens": 4}\n')
    assert records[0]["url"] == "/v1/completions" and records[0]["body"]["prompt"] == "Once upon a time"


@pytest.mark.parametrize(
    "data, line, message",
    [
        (b"", 0, "holds no prompts"),
        (b"\n  \n", 0, "holds no prompts"),
        (b"ok\nbad \x00 byte\n", 2, "binary data"),
        (b"ok\n\xff\xfe nope\n", 2, "not UTF-8"),
        (b'{"messages": [{"role": "user", "content": "a"}]}\n{"messages": [\n', 2, "invalid JSON"),
        (b'{"prompt": "a", "temprature": 1}\n', 1, "unknown field temprature"),
        (b'{"prompt": "a", "stream": true}\n', 1, "unknown field stream"),
        (b'{"messages": [{"content": "a"}]}\n', 1, "message 1 needs a role"),
        (b'{"prompt": "a", "messages": []}\n', 1, "messages or prompt (one of them)"),
        (b'{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n', 2, "id 'x' is also on line 1"),
        (b'{"prompt": "a"}\n["a list"]\n', 2, "must be a JSON object"),
        (b'{"custom_id": "1", "method": "GET", "url": "/v1/chat/completions", "body": {}}\n', 1, "method must be POST"),
        (b'{"custom_id": "1", "url": "/v1/images", "body": {}}\n', 1, "url must be one of"),
        (b'{"custom_id": "1", "url": "/v1/completions", "body": {"prompt": "a"}, "extra": 1}\n', 1, "unknown field"),
        (b'{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n', 0, "mixes"),
        (b'{"prompt": "a", "n": 3}\n', 1, "n must be 1"),
    ],
)
def test_a_bad_file_is_refused_with_the_line_and_the_reason(data: bytes, line: int, message: str) -> None:
    errors = refused(data)
    assert any(n == line and message in text for n, text in errors), errors


def test_a_line_or_a_file_over_the_limits_is_refused_and_reading_stops_at_the_file_limit() -> None:
    limits = Limits(max_bytes=10_000, max_line_bytes=100, max_prompts=3)
    assert refused(b"short\n" + b"x" * 500 + b"\nshort again\n", limits=limits) == [
        (2, "longer than the limit of 100 bytes")
    ]
    assert refused(b"a\nb\nc\nd\n", limits=limits) == [(4, "more than 3 prompts in one run")]
    errors = refused(b"line\n" * 5000, limits=Limits(max_bytes=10_000, max_line_bytes=100))
    assert errors == [(2001, "the file is larger than the limit of 10,000 bytes")]


def test_every_error_comes_at_once_up_to_a_bound() -> None:
    with pytest.raises(InputError) as caught:
        run(b"{bad\n" * 50, format="jsonl")
    assert [n for n, _ in caught.value.errors] == list(range(1, 21)) and caught.value.more == 30
    assert "... and 30 more" in str(caught.value)


def test_defaults_and_a_forced_format_are_checked_too() -> None:
    assert "unknown field colour" in refused(b"a\n", defaults={"colour": "red"})[0][1]
    assert "unknown format" in refused(b"a\n", format="csv")[0][1]
    _, records = run(b'{"looks": "like json"}\n', format="text")  # the researcher said it is text
    assert records[0]["body"]["messages"][0]["content"] == '{"looks": "like json"}'


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1), min_size=1))
def test_any_text_prompts_come_out_one_request_each_in_order(prompts: list[str]) -> None:
    prompts = [p for p in prompts if p.strip() and not p.lstrip().startswith("{")]
    if not prompts:
        return
    data = "\n".join(prompts).encode()
    _, records = run(data, format="text")
    assert [r["body"]["messages"][-1]["content"] for r in records] == prompts
