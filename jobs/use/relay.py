"""Relaying a byte stream in as few pieces as it allows, without waiting for any of them.

llama-server sends each token as its own HTTP chunk. Passing them on one by one costs Django and uvicorn an ASGI
message and a socket write per token, which is most of what the proxy spends while a fast stream runs. Here a
reader task collects what arrives, and the relay hands on everything that has arrived since its last send: a token
that comes alone goes on at once, and a burst goes on as one piece, as nginx does it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

MAX_BUFFERED = 1 << 20  # past this much unsent data the reader waits for the client (a slow client, a huge reply)


async def coalesced(source: AsyncIterator[bytes], max_buffered: int = MAX_BUFFERED) -> AsyncGenerator[bytes, None]:
    """The bytes of `source`, in order, joined into as few pieces as their timing allows.

    An error from `source` is raised here after the bytes that came before it. When the consumer stops early (the
    client went away), the reader is cancelled, so `source` is not read any further.
    """
    pending: list[bytes] = []
    size = 0
    arrived = asyncio.Event()
    drained = asyncio.Event()
    finished = False

    async def read() -> None:
        nonlocal size, finished
        try:
            async for piece in source:
                if not piece:
                    continue
                while size >= max_buffered:
                    drained.clear()
                    await drained.wait()
                pending.append(piece)
                size += len(piece)
                arrived.set()
        finally:
            finished = True
            arrived.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            if pending:
                data = b"".join(pending)
                pending.clear()
                size = 0
                drained.set()
                yield data
            elif finished:
                break
            else:
                arrived.clear()
                await arrived.wait()
        reader.result()  # the source's error, if it ended with one
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
