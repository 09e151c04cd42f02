"""The relay that joins what a model server sends into as few pieces as its timing allows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.use.relay import coalesced


async def burst(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def collect(source: AsyncIterator[bytes], **kwargs: int) -> list[bytes]:
    return [piece async for piece in coalesced(source, **kwargs)]


@given(st.lists(st.binary(max_size=50), max_size=40))
def test_every_byte_arrives_in_order(pieces: list[bytes]) -> None:
    out = asyncio.run(collect(burst(pieces)))
    assert b"".join(out) == b"".join(pieces)
    assert all(out)  # no empty pieces are sent on


def test_a_burst_goes_on_as_one_piece() -> None:
    tokens = [b"data: %d\n\n" % i for i in range(500)]
    out = asyncio.run(collect(burst(tokens)))
    assert b"".join(out) == b"".join(tokens)
    assert len(out) < 10  # the reader gets ahead while the relay is busy; 500 pieces would mean no joining


def test_paced_tokens_go_on_one_by_one_without_waiting() -> None:
    async def paced() -> AsyncIterator[bytes]:
        for i in range(5):
            yield b"token %d" % i
            await asyncio.sleep(0.02)

    async def run() -> list[tuple[bytes, float]]:
        start = asyncio.get_running_loop().time()
        return [(piece, asyncio.get_running_loop().time() - start) async for piece in coalesced(paced())]

    out = asyncio.run(run())
    assert [piece for piece, _ in out] == [b"token %d" % i for i in range(5)]
    assert out[0][1] < 0.015  # the first token was not held back for the second


def test_an_error_comes_after_the_bytes_before_it() -> None:
    async def breaking() -> AsyncIterator[bytes]:
        yield b"one"
        yield b"two"
        raise ConnectionResetError("upstream went away")

    async def run() -> tuple[bytes, BaseException | None]:
        got = b""
        try:
            async for piece in coalesced(breaking()):
                got += piece
        except ConnectionResetError as exc:
            return got, exc
        return got, None

    got, error = asyncio.run(run())
    assert got == b"onetwo" and isinstance(error, ConnectionResetError)


def test_a_consumer_that_stops_stops_the_reading() -> None:
    read = 0
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        nonlocal read
        try:
            while True:
                read += 1
                yield b"x"
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    async def run() -> int:
        relay = coalesced(endless())
        await relay.__anext__()
        await relay.aclose()  # what Django does when the client goes away
        await asyncio.wait_for(closed.wait(), 1)
        seen = read
        await asyncio.sleep(0.05)
        return read - seen

    assert asyncio.run(run()) == 0


def test_a_slow_consumer_holds_back_the_reader() -> None:
    read = 0

    async def fast() -> AsyncIterator[bytes]:
        nonlocal read
        for _ in range(1000):
            read += 1
            yield b"y" * 100
            await asyncio.sleep(0)

    async def run() -> int:
        relay = coalesced(fast(), max_buffered=1000)
        await relay.__anext__()
        await asyncio.sleep(0.05)  # a client that does not read
        held = read
        await relay.aclose()
        return held

    assert asyncio.run(run()) < 30  # about max_buffered / 100 pieces past the first, not all 1000


@pytest.mark.parametrize("max_buffered", [1, 64])
def test_a_tiny_buffer_still_relays_everything(max_buffered: int) -> None:
    pieces = [bytes([i % 256]) * (i % 7 + 1) for i in range(300)]
    assert b"".join(asyncio.run(collect(burst(pieces), max_buffered=max_buffered))) == b"".join(pieces)
