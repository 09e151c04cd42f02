"""Recording what each request through the proxy used: a Meter watches one reply as it is relayed (time to first
byte, bytes, the tokens) and writes one ProxyRequest row when it ends, off the event loop.

Tokens come from the server's own `usage` object where it sends one (non-streamed replies; streams whose client
asked for `stream_options.include_usage`; the Responses API's `response.completed` event; Anthropic's `message_start`
for the prompt and `message_delta` for the output), in OpenAI's names (prompt_tokens, completion_tokens) or the
Responses API's and Anthropic's (input_tokens, output_tokens, and Anthropic's cache fields), else from llama-server's
`timings` (prompt_n and cache_n, predicted_n), which it adds to every stream's last event. Failing both, a stream's
completion tokens are counted from its events: one token per event, less the first and last events when they carry
no text (the role and the finish reason), as vLLM, llama-server and transformers send them; the prompt's tokens are
then unknown (0, tokens_reported False). The prompt's tokens are all of them, those read from a cache included
(`cached_tokens` says how many were).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.utils import timezone

from jobs.models import ProxyRequest
from jobs.operations import metrics

log = logging.getLogger(__name__)

KEPT_BYTES = 1 << 16  # of a reply's start and end: where the first event, the last ones and `usage` are
WHOLE_JSON_BYTES = 4 << 20  # a JSON reply up to this size is parsed whole for its usage
# An object with objects one level down in it (OpenAI's usage has prompt_tokens_details and completion_tokens_details).
_OBJECT = rb"(\{(?:[^{}]|\{[^{}]*\})*\})"
_USAGE = re.compile(rb'"usage"\s*:\s*' + _OBJECT)
_TIMINGS = re.compile(rb'"timings"\s*:\s*' + _OBJECT)


@dataclass
class Meter:
    """One request's reply, as the proxy relays it."""

    session_pk: str
    user_pk: int
    route: str  # ProxyRequest.Route
    endpoint: str
    bytes_in: int = 0
    tokens: str = "generates"  # what the route's token counts mean (ApiRoute.tokens); "": it uses none
    at: datetime = field(default_factory=timezone.now)
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    streamed: bool = False
    first_byte: float | None = None
    bytes_out: int = 0
    events: int = 0
    head: bytes = b""
    recent: deque[bytes] = field(default_factory=deque)  # the last pieces, at least KEPT_BYTES of them in all
    recent_bytes: int = 0
    body: bytearray = field(default_factory=bytearray)
    overflowed: bool = False
    done: bool = False

    def begin(self, status: int, content_type: str) -> None:
        self.status = status
        self.streamed = content_type.partition(";")[0].strip().lower() == "text/event-stream"

    def feed(self, chunk: bytes) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()
        self.bytes_out += len(chunk)
        if self.streamed:
            self.events += chunk.count(b"data: {")
            if len(self.head) < KEPT_BYTES:
                self.head += chunk[: KEPT_BYTES - len(self.head)]
            self._keep(chunk)
        elif not self.overflowed and len(self.body) + len(chunk) <= WHOLE_JSON_BYTES:
            self.body += chunk
        else:  # too large to parse whole (embeddings of many inputs): `usage` is near the end
            if not self.overflowed:
                self.overflowed = True
                self._keep(bytes(self.body))
                self.body = bytearray()
            self._keep(chunk)

    def _keep(self, chunk: bytes) -> None:
        """Remember the stream's end without copying it at every piece (a stream sends one per token)."""
        self.recent.append(chunk)
        self.recent_bytes += len(chunk)
        while self.recent_bytes - len(self.recent[0]) >= KEPT_BYTES:
            self.recent_bytes -= len(self.recent.popleft())

    @property
    def tail(self) -> bytes:
        return b"".join(self.recent)[-KEPT_BYTES:]

    def finish(self, status: int | None = None) -> ProxyRequest | None:
        """The reply ended (or never began: `status` is the portal's own answer): the row to record, once."""
        if self.done:
            return None
        self.done = True
        if status is not None:
            self.status = status
        end = time.perf_counter()
        prompt, completion, cached, reported = self._tokens()
        ttft = (self.first_byte - self.started) if self.streamed and self.first_byte is not None else None
        generating = end - (self.first_byte if self.streamed and self.first_byte is not None else self.started)
        speed = completion / generating if completion > 1 and generating > 0 else None
        duration = end - self.started
        metrics.observe_request(self.route, self.endpoint, self.status, ttft, duration, self.bytes_out)
        return ProxyRequest(
            session_id=self.session_pk,
            user_id=self.user_pk,
            at=self.at,
            route=self.route,
            endpoint=self.endpoint[:32],
            status=self.status,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            tokens_reported=reported,
            ttft_ms=None if ttft is None else ttft * 1000,
            duration_ms=duration * 1000,
            tokens_per_s=speed,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
        )

    def _tokens(self) -> tuple[int, int, int, bool]:
        """The prompt's tokens, the completion's, those of the prompt read from a cache, and whether the server said."""
        if self.status >= 400:
            return 0, 0, 0, True
        if not self.streamed:
            usage = _found(_USAGE, self.tail) if self.overflowed else _usage_of_json(bytes(self.body))
            if usage is not None:
                return (*_used(usage), True)
            return 0, 0, 0, not self.tokens
        tail = self.tail
        usage = _found(_USAGE, tail)
        if usage is not None:
            prompt, completion, cached = _used(usage)
            if not _says_input(usage):
                # Anthropic's last `usage` (message_delta) counts the output; message_start, first, the input.
                start = _found(_USAGE, self.head, last=False)
                if start is not None:
                    prompt, _, cached = _used(start)
            return prompt, completion, cached, True
        timings = _found(_TIMINGS, tail)
        if timings is not None:
            # prompt_n counts only the prompt's tokens it computed; cache_n those it found in its cache
            cached = _count(timings, "cache_n")
            return _count(timings, "prompt_n") + cached, _count(timings, "predicted_n"), cached, True
        silent = int(not _carries_text(self.head, first=True)) + int(not _carries_text(tail, first=False))
        return 0, max(0, self.events - silent), 0, False


def _usage_of_json(body: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    usage = payload.get("usage") if isinstance(payload, dict) else None
    return usage if isinstance(usage, dict) else None


# Anthropic counts the prompt's tokens read from (or written to) its cache apart from input_tokens.
ANTHROPIC_CACHE = ("cache_read_input_tokens", "cache_creation_input_tokens")


def _used(usage: dict[str, Any]) -> tuple[int, int, int]:
    """The prompt's tokens (all of them), the completion's, and those of the prompt read from a cache, from a `usage`
    object in any of the three APIs' names."""
    prompt = _count(usage, "prompt_tokens") or _count(usage, "input_tokens")
    completion = _count(usage, "completion_tokens") or _count(usage, "output_tokens")
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = _count(details, "cached_tokens") if isinstance(details, dict) else 0
    if any(name in usage for name in ANTHROPIC_CACHE):
        prompt += sum(_count(usage, name) for name in ANTHROPIC_CACHE)
        cached = _count(usage, "cache_read_input_tokens")
    return prompt, completion, cached


def _says_input(usage: dict[str, Any]) -> bool:
    return any(name in usage for name in ("prompt_tokens", "input_tokens", *ANTHROPIC_CACHE))


def _found(pattern: re.Pattern[bytes], text: bytes, last: bool = True) -> dict[str, Any] | None:
    """The last (or first) `"usage": {...}` (or timings) object in `text` that parses and is not null."""
    matches = list(pattern.finditer(text))
    for match in reversed(matches) if last else matches:
        try:
            value = json.loads(match.group(1))
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _count(values: dict[str, Any], name: str) -> int:
    value = values.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _carries_text(kept: bytes, *, first: bool) -> bool:
    """Whether the first (or last) `data: {...}` event in `kept` carries generated text."""
    events = [line[6:] for line in kept.split(b"\n") if line.startswith(b"data: {")]
    if not events:
        return False
    try:
        event = json.loads(events[0] if first else events[-1])
    except ValueError:
        return True  # cut off by the kept window: a token event in the middle of a long stream
    for choice in event.get("choices") or [] if isinstance(event, dict) else []:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        if delta.get("content") or delta.get("reasoning_content") or choice.get("text"):
            return True
    return False


def save(row: ProxyRequest | None) -> None:
    """Write the row (on the proxy's database threads); a failure to record never fails the request."""
    if row is None:
        return
    try:
        row.save(force_insert=True)
    except Exception:  # the database went away, the session was deleted meanwhile: the reply was still served
        log.warning("could not record a proxy request of session %s", row.session_id, exc_info=True)
