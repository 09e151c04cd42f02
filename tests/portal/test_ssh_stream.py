"""A command's standard input streamed as it comes (a shared adapter's archive from another account,
jobs/sessions/adapter_copies.py): chunks go in order, and once the command has exited (it refused what it read) no
more are taken and its answer is what the caller gets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from portal import ssh


class FakeChannel:
    def __init__(self, exits_after: int) -> None:
        self.received: list[bytes] = []
        self.exits_after = exits_after
        self.closed = False
        self.eof_received = False
        self.input_ended = False

    def settimeout(self, timeout: float | None) -> None:
        pass

    def exec_command(self, command: str) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        if self.exit_status_ready():
            raise OSError("Socket is closed")
        self.received.append(data)

    def shutdown_write(self) -> None:
        self.input_ended = True

    def exit_status_ready(self) -> bool:
        return self.input_ended or len(self.received) >= self.exits_after

    def recv_ready(self) -> bool:
        return False

    def recv_stderr_ready(self) -> bool:
        return False

    def recv_exit_status(self) -> int:
        self.eof_received = True
        return 3 if self.exits_after < 99 else 0

    def fileno(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


class FakeTransport:
    def __init__(self, channel: FakeChannel) -> None:
        self.channel = channel

    def is_active(self) -> bool:
        return True

    def open_session(self, timeout: float) -> FakeChannel:
        return self.channel


class FakeClient:
    def __init__(self, channel: FakeChannel) -> None:
        self.transport = FakeTransport(channel)

    def get_transport(self) -> FakeTransport:
        return self.transport


def run_with(channel: FakeChannel, chunks: Iterator[bytes], monkeypatch: Any) -> ssh.CommandResult:
    monkeypatch.setattr("portal.ssh.select.select", lambda *args: ([], [], []))
    channel.eof_received = True
    target = ssh.SSHTarget("127.0.0.1", 22, "ada", "", "")
    return ssh._run_on(FakeClient(channel), target, "receive", 10, chunks, 1000)  # type: ignore[arg-type]


def test_a_streamed_input_goes_in_order_and_whole(monkeypatch: Any) -> None:
    channel = FakeChannel(exits_after=99)
    result = run_with(channel, iter([b"a", b"b", b"c"]), monkeypatch)
    assert channel.received == [b"a", b"b", b"c"] and result.exit_code == 0 and channel.closed


def test_a_command_that_exits_early_takes_no_more_and_its_answer_comes_back(monkeypatch: Any) -> None:
    taken: list[int] = []

    def chunks() -> Iterator[bytes]:
        for n in range(10):
            taken.append(n)
            yield b"x"

    channel = FakeChannel(exits_after=2)
    result = run_with(channel, chunks(), monkeypatch)
    assert channel.received == [b"x", b"x"] and result.exit_code == 3
    assert len(taken) == 3  # the third chunk found the command gone; the rest were never read
