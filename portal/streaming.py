"""Downloads made by a synchronous iterator (a batch run's results read over SSH, an uploaded file), streamed under
ASGI as they are read.

Under ASGI, Django 5.2 serves a StreamingHttpResponse over a synchronous iterator with `sync_to_async(list)`: the
whole download is read into memory before its first byte goes out, on the request's thread-sensitive thread (on the
API's route, portal.asgi.BareHandler, one thread that every OpenAI Files and Batch request waits for meanwhile). Here
the iterator is read on worker threads instead, and what it has given goes out as it comes:

- `in_thread(chunks)`: the iterator as an async one. One read at a time runs on a thread, pulling chunks into a buffer
  that the event loop takes from, so the order is kept and a line-by-line iterator costs one hop to the loop per
  gathered piece (up to PIECE_BYTES), not per line; a source that stalls still has what it gave sent after LINGER_S.
  When the consumer stops early (the client went away) the iterator is closed on a thread, once the read in flight
  has returned, and what it raised reaches the consumer after what it gave before.
- `StreamingResponse`: Django's StreamingHttpResponse over such an iterator, unchanged for WSGI and Django's test
  client, read through `in_thread` under ASGI.

The iterators must not need the ORM: their reads run on threads of their own, not the request's (whose database
connection Django closes when the response ends); look up what they need in the view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from django.http import StreamingHttpResponse

log = logging.getLogger(__name__)

PIECE_BYTES = 1 << 16  # what one message to the client carries at most (Django's ASGI handler chunks by this too)
LINGER_S = 0.02  # how long a part-filled piece waits for more before it is sent anyway

# Reads block on the network (an SSH channel's recv, up to its idle timeout), so they get threads of their own rather
# than the loop's default executor, which serves static files and DNS lookups. A read gives its thread back after a
# piece's worth, so more downloads than threads take turns a piece at a time.
_threads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="download")


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Pump:
    """A synchronous iterator read on worker threads into a buffer that one consumer on the event loop takes from.

    The lock is held only to move chunks and flags, never while the iterator runs, so the loop never waits on a read.
    """

    def __init__(self, chunks: Iterable[bytes], piece_bytes: int, linger_s: float) -> None:
        self._chunks = iter(chunks)
        self._piece_bytes, self._linger_s = piece_bytes, linger_s
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._pieces: list[bytes] = []  # read, not yet taken
        self._size = 0
        self._reading = False  # a read is on a thread (only it touches the iterator)
        self._ended = False  # the iterator is exhausted or raised: no read starts again
        self._error: BaseException | None = None
        self._stopping = False  # the consumer is gone
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None  # the consumer's, while it waits for the read

    def _wake(self) -> None:
        """Under the lock, from a read: the consumer, if it waits."""
        if self._waiter is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                self._loop.call_soon_threadsafe(_resolve, self._waiter)
            self._waiter = None

    def _read(self) -> None:
        """On a worker thread: pull chunks until a piece's worth has been pulled, the iterator ends or the consumer is
        gone; wake the consumer when the buffer gets its first chunk (it starts to linger), when it holds a piece, and
        when the read returns. The iterator is closed here once it ended or the consumer is gone."""
        pulled, ended, error = 0, False, None
        try:
            while pulled < self._piece_bytes:
                try:
                    chunk = next(self._chunks)
                except StopIteration:
                    ended = True
                    break
                if not chunk:
                    continue
                pulled += len(chunk)
                with self._lock:
                    if self._stopping:
                        break
                    self._pieces.append(chunk)
                    self._size += len(chunk)
                    if self._size == len(chunk) or self._size >= self._piece_bytes:
                        self._wake()
        except BaseException as exc:  # handed to the consumer, raised there
            ended, error = True, exc
        with self._lock:
            self._ended = self._ended or ended
            self._error = self._error or error
            close = (self._ended or self._stopping) and not self._closed
            self._closed = self._closed or close
        if close:  # still _reading: the consumer waits for it
            self._close_iterator()
        with self._lock:
            self._reading = False
            self._wake()

    def _close_iterator(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is None:
            return
        try:
            close()
        except Exception:  # the download is over either way; its reader's clean-up failing is worth a line
            log.warning("closing a download's source failed", exc_info=True)

    def _start(self) -> bool:
        """Under the lock: whether a read is to start now (none is running, and more may come)."""
        if self._reading or self._ended or self._stopping:
            return False
        self._reading = True
        return True

    def _submit(self, start: bool) -> None:
        if start:
            self._loop.run_in_executor(_threads, self._read)

    async def take(self) -> bytes | None:
        """The next piece: a piece's worth, or less once the iterator has ended, the read has returned or LINGER_S
        passed since the first chunk waited; None at the end. What the iterator raised is raised here, after the
        pieces read before it."""
        lingered = False
        while True:
            with self._lock:
                ready = lingered or self._ended or not self._reading or self._size >= self._piece_bytes
                piece = b""
                if self._pieces and ready:
                    piece = b"".join(self._pieces)
                    self._pieces.clear()
                    self._size = 0
                ended, error = self._ended, self._error
                start = self._start()  # the next read runs while this piece is sent
                waiting = bool(self._pieces)
                waiter = None
                if not piece and not ended:
                    waiter = self._waiter = self._loop.create_future()
            self._submit(start)
            if piece:
                return piece
            if error is not None:
                raise error
            if waiter is None:
                return None
            if waiting:  # a part-filled piece: wait a little for the rest
                await asyncio.wait({waiter}, timeout=self._linger_s)
                lingered = True
            else:
                await waiter

    async def close(self) -> None:
        """Drop what is unsent and close the iterator: by the read in flight when it returns (it may be inside the
        iterator, which cannot be closed from another thread meanwhile), else on a thread here."""
        while True:
            with self._lock:
                self._stopping = True
                self._pieces.clear()
                if not self._reading:
                    close = not self._closed
                    self._closed = True
                    break
                waiter = self._waiter = self._loop.create_future()
            await waiter
        if close:
            await self._loop.run_in_executor(_threads, self._close_iterator)


async def in_thread(
    chunks: Iterable[bytes], *, piece_bytes: int = PIECE_BYTES, linger_s: float = LINGER_S
) -> AsyncGenerator[bytes, None]:
    """The chunks of a synchronous iterator as they are read on worker threads, gathered into pieces of up to about
    piece_bytes; the iterator (if it has a close()) is closed once it ends or the consumer stops (aclose(), or
    cancelled while it waits for a piece)."""
    pump = _Pump(chunks, piece_bytes, linger_s)
    try:
        while (piece := await pump.take()) is not None:
            yield piece
    finally:
        await pump.close()


class StreamingResponse(StreamingHttpResponse):
    """A StreamingHttpResponse over a synchronous iterator that streams under ASGI too (through `in_thread`); served
    by WSGI or Django's test client, it is Django's own.

    Django's response.close() closes the iterator as well (StreamingHttpResponse keeps its close()): under ASGI it runs
    once the response was sent or abandoned, when `in_thread` has let go of the iterator, so never during a read."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.is_async:
            async for part in super().__aiter__():
                yield part
            return
        content = self.streaming_content
        assert isinstance(content, Iterator)  # not is_async
        async with contextlib.aclosing(in_thread(content)) as pieces:
            async for piece in pieces:
                yield piece
