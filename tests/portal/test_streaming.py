"""A synchronous iterator read on worker threads and served as it comes (portal/streaming.py): order, pieces gathered,
a stalling source's first bytes, closing when the consumer stops early, errors reaching the consumer; and the
response that streams under ASGI and stays Django's own under WSGI."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import TypeVar

import pytest

from portal.streaming import StreamingResponse, in_thread

T = TypeVar("T")
WAIT_S = 10.0  # a stalled test fails after this instead of hanging the run


def run(awaitable: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, WAIT_S)

    return asyncio.run(bounded())


async def collect(pieces: AsyncIterator[bytes]) -> list[bytes]:
    return [piece async for piece in pieces]


class Source:
    """A synchronous iterator that notes the threads it ran on and whether it was closed."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.threads: set[threading.Thread] = set()
        self.pulled = 0
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self.chunks:
                self.threads.add(threading.current_thread())
                self.pulled += 1
                yield chunk
        finally:
            self.threads.add(threading.current_thread())
            self.closed.set()


def test_the_pieces_keep_the_sources_order_and_are_read_off_the_event_loop() -> None:
    lines = [f"line {n}\n".encode() for n in range(5000)]
    source = Source(iter(lines))
    chunks = iter(source)
    pieces = run(collect(in_thread(chunks)))
    assert b"".join(pieces) == b"".join(lines)
    assert threading.main_thread() not in source.threads and source.closed.is_set()


def test_small_chunks_are_gathered_into_pieces_of_up_to_the_piece_size() -> None:
    lines = [bytes([65 + n % 26]) * 99 + b"\n" for n in range(1000)]
    pieces = run(collect(in_thread(iter(lines), piece_bytes=1000, linger_s=WAIT_S)))
    assert [len(piece) for piece in pieces] == [1000] * 100  # a hop to the loop per ten lines, not per line
    assert b"".join(pieces) == b"".join(lines)


def test_the_default_pieces_gather_a_line_by_line_source() -> None:
    lines = [b"x" * 99 + b"\n" for _ in range(20_000)]  # 2 MB
    pieces = run(collect(in_thread(iter(lines))))
    assert b"".join(pieces) == b"".join(lines) and len(pieces) < len(lines) / 10
    assert max(len(piece) for piece in pieces) <= (1 << 16) + 100  # a piece, and the chunk that filled it


def test_what_a_stalling_source_gave_reaches_the_consumer_before_the_source_goes_on() -> None:
    seen = threading.Event()

    def stalling() -> Iterator[bytes]:
        yield b"first"
        if not seen.wait(WAIT_S):
            raise AssertionError("the first chunk was held back until the source went on")
        yield b"rest"

    async def consume() -> list[bytes]:
        async with contextlib.aclosing(in_thread(stalling())) as pieces:
            first = await anext(pieces)
            seen.set()
            return [first, *[piece async for piece in pieces]]

    assert run(consume()) == [b"first", b"rest"]


def test_a_consumer_that_stops_early_closes_the_source_on_a_worker_thread() -> None:
    source = Source(itertools.repeat(b"y" * 100))  # endless

    async def take_one() -> bytes:
        async with contextlib.aclosing(in_thread(iter(source), piece_bytes=1000)) as pieces:
            return await anext(pieces)

    assert run(take_one()) == b"y" * 1000
    assert source.closed.is_set() and threading.main_thread() not in source.threads
    assert source.pulled <= 20  # the piece sent and the one read meanwhile, then no more


def test_a_consumer_that_is_cancelled_closes_the_source() -> None:
    source = Source(itertools.repeat(b"z"))

    async def cancel_while_reading() -> None:
        async def consume() -> None:  # as Django's ASGI handler does, which a client that goes away cancels
            async with contextlib.aclosing(in_thread(iter(source))) as pieces:
                async for _ in pieces:
                    pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run(cancel_while_reading())
    assert source.closed.is_set()


def test_an_error_in_the_source_reaches_the_consumer_after_what_it_gave_before() -> None:
    def broken() -> Iterator[bytes]:
        yield b"a"
        yield b"b"
        raise ValueError("the connection broke while reading")

    got: list[bytes] = []

    async def consume() -> None:
        async for piece in in_thread(broken()):
            got.append(piece)

    with pytest.raises(ValueError, match="the connection broke"):
        run(consume())
    assert b"".join(got) == b"ab"


def test_the_response_streams_its_iterator_to_async_and_sync_consumers_without_django_s_warning() -> None:
    lines = [f"{n}\n".encode() for n in range(100)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        served = run(collect(aiter(StreamingResponse(iter(lines)))))
        assert b"".join(served) == b"".join(lines)  # under ASGI: through in_thread
        assert b"".join(StreamingResponse(iter(lines))) == b"".join(lines)  # under WSGI: Django's own
