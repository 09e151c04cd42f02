"""A batch run's runner, on the compute node: sends each request of a requests JSONL file (jobs/batch/inputs.py wrote
it) to the session's model server(s) and records each answer exactly once. Python standard library only.

    python3 batchrun.py --requests requests.jsonl --results results.jsonl --progress progress.json \
        --server http://ADDR:PORT [--server ...] --key-file api_key --model NAME --concurrency N [--output output.jsonl]

Exactly once, across kills and restarts: every answer (or final failure) is one line appended to the results file
with one write, handed to the kernel at once (a killed runner loses nothing) and fsynced about once a second (a node
that crashes loses at most the last second, whose requests are sent again); a restarted runner reads the file, drops
a torn or zeroed tail, and sends only what has no line yet. An exclusive lock on the results file keeps two runners
of one run from writing it at once.

Several servers (replicas) share the work: each has `concurrency` requests in flight. A request that fails in a way
that may pass (no connection, a timeout, 429, 5xx) is tried again, up to --attempts times, on whichever server is free;
a server that keeps failing is rested, so a dead replica's prompts go to the others. A 4xx answer is final: the line
is recorded as failed with the server's reason and the run goes on.

The progress file (written atomically about once a second) says how far it is; when every line has its answer, the
results are written once more in input order to --output and the progress says "finished". SIGTERM stops it cleanly:
requests in flight are not recorded, so they are sent again when it starts next.
"""

from __future__ import annotations

import argparse
import fcntl
import http.client
import json
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TRANSIENT_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class Transient(Exception):
    """Worth trying again, maybe on another server."""


class Server:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise SystemExit(f"batchrun: --server must be http://HOST:PORT, not {url!r}")
        self.url, self.host, self.port = url, parts.hostname, parts.port
        self.failures = 0
        self.rested_until = 0.0
        self.lock = threading.Lock()

    def usable(self) -> bool:
        return time.monotonic() >= self.rested_until

    def failed(self) -> None:
        with self.lock:
            self.failures += 1
            if self.failures >= 3:  # resting grows with each failure, up to a minute
                self.rested_until = time.monotonic() + min(60.0, 2.0 ** (self.failures - 2))

    def answered(self) -> None:
        with self.lock:
            self.failures = 0

    def connect(self, timeout_s: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)

    def post(self, connection: http.client.HTTPConnection, path: str, body: bytes, key: str) -> dict[str, Any]:
        """One request on the worker's kept-alive connection (reopened by http.client when the server closed it)."""
        try:
            connection.request(
                "POST", path, body, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
            )
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise Transient(f"{self.url}: {exc.__class__.__name__}: {exc}") from None
        if response.will_close:
            connection.close()
        if response.status in TRANSIENT_STATUS:
            raise Transient(f"{self.url}: HTTP {response.status}: {data[:300].decode(errors='replace')}")
        try:
            answer = json.loads(data)
        except ValueError:
            raise Transient(f"{self.url}: HTTP {response.status}, not JSON") from None
        if response.status != 200:
            raise PermissionError(f"HTTP {response.status}: {json.dumps(answer)[:500]}")  # final
        return answer if isinstance(answer, dict) else {"answer": answer}


class Results:
    """The append-only results file and what it already holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = open(path, "a+b")  # noqa: SIM115 -- held, and locked, for the run's life
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"batchrun: another runner is writing {path}") from None
        self.done: dict[int, bool] = {}  # line -> answered (True) or failed (False)
        self.tokens = [0, 0]
        self._read_back()
        self.lock = threading.Lock()

    def _read_back(self) -> None:
        self.handle.seek(0)
        good = 0
        for raw in self.handle:
            if not raw.endswith(b"\n") or b"\x00" in raw:
                break  # torn by a kill mid-write, or zeroed by a crash: dropped, and its request is sent again
            try:
                record = json.loads(raw)
            except ValueError:
                break
            self._count(record)
            good += len(raw)
        self.handle.truncate(good)
        self.handle.seek(0, os.SEEK_END)

    def _count(self, record: dict[str, Any]) -> None:
        self.done[int(record["line"])] = record.get("error") is None
        usage = (record.get("response") or {}).get("usage") or {}
        self.tokens[0] += int(usage.get("prompt_tokens") or 0)
        self.tokens[1] += int(usage.get("completion_tokens") or 0)

    def add(self, record: dict[str, Any]) -> None:
        data = json.dumps(record, ensure_ascii=False).encode() + b"\n"
        with self.lock:
            if int(record["line"]) in self.done:
                return  # never twice
            self.handle.write(data)
            self.handle.flush()  # to the kernel: a killed runner loses nothing
            self._count(record)

    def sync(self) -> None:
        """To the disk (about once a second, and at the end): a crashed node loses at most what came since."""
        with self.lock:
            os.fsync(self.handle.fileno())


def read_requests(path: Path) -> list[tuple[int, int]]:
    """(line, byte offset) of every request, so a large file is not held in memory."""
    index = []
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            index.append((int(json.loads(raw)["line"]), offset))
            offset += len(raw)
    return index


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.key = args.key_file.read_text().strip()
        self.base_weights = {"lora": [{"id": 0, "scale": 0.0}]} if args.base_weights else {}  # unlisted: at 0
        self.servers = [Server(url) for url in args.server]
        self.results = Results(args.results)
        self.index = read_requests(args.requests)
        self.total = len(self.index)
        # (line, offset, attempts so far); None wakes a worker to see that the run is stopping
        self.todo: queue.Queue[tuple[int, int, int] | None] = queue.Queue()
        for line, offset in self.index:
            if line not in self.results.done:
                self.todo.put((line, offset, 0))
        self.outstanding = self.todo.qsize()
        self.outstanding_lock = threading.Lock()
        self.stopping = threading.Event()
        self.started = time.time()
        self.resumed_with = len(self.results.done)
        self.requests_file = open(args.requests, "rb")  # noqa: SIM115 -- read by offset for the run's life
        self.read_lock = threading.Lock()

    def request(self, offset: int) -> dict[str, Any]:
        with self.read_lock:
            self.requests_file.seek(offset)
            return dict(json.loads(self.requests_file.readline()))

    def finish_one(self) -> None:
        with self.outstanding_lock:
            self.outstanding -= 1
            if self.outstanding == 0:
                self.stop()

    def stop(self) -> None:
        self.stopping.set()
        for _ in range(len(self.servers) * self.args.concurrency):
            self.todo.put(None)

    def work(self, server: Server) -> None:
        connection = server.connect(self.args.timeout)
        while not self.stopping.is_set():
            if not server.usable():
                time.sleep(0.2)
                continue
            try:
                item = self.todo.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            line, offset, attempts = item
            request = self.request(offset)
            # A body that names its model (a fine-tune comparison's adapter run: the adapter's name, and llama-server's
            # `lora` for it) keeps it; the portal's checked prompts never do (jobs/batch/inputs.py).
            body = json.dumps({"model": self.args.model, **self.base_weights, **request["body"]}).encode()
            start = time.monotonic()
            record: dict[str, Any] = {"line": line, "id": request["id"], "attempts": attempts + 1}
            try:
                answer = server.post(connection, request["url"], body, self.key)
            except Transient as exc:
                server.failed()
                if self.stopping.is_set():
                    return  # not recorded: sent again next time
                if attempts + 1 < self.args.attempts:
                    time.sleep(min(30.0, 0.5 * 2**attempts))
                    self.todo.put((line, offset, attempts + 1))
                    continue
                record.update(error=str(exc), response=None)
            except PermissionError as exc:
                server.answered()
                record.update(error=str(exc), response=None)
            else:
                server.answered()
                record.update(error=None, response=answer)
            record["latency_s"] = round(time.monotonic() - start, 4)
            self.results.add(record)
            self.finish_one()

    def progress(self, state: str) -> None:
        done = self.results.done
        failed = sum(1 for ok in done.values() if not ok)
        elapsed = max(1e-9, time.time() - self.started)
        completion = self.results.tokens[1]
        report = {
            "state": state, "total": self.total, "done": len(done) - failed, "failed": failed,
            "remaining": self.total - len(done), "prompt_tokens": self.results.tokens[0],
            "completion_tokens": completion, "started_at": self.started, "updated_at": time.time(),
            "answered_this_start": len(done) - self.resumed_with,
            "tokens_per_s": round(completion / elapsed, 2) if len(done) > self.resumed_with else 0.0,
            "servers": len(self.servers),
        }  # fmt: skip
        tmp = self.args.progress.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        os.replace(tmp, self.args.progress)

    def write_output(self) -> None:
        """The results in input order: read back by offset, so only the index is in memory."""
        offsets: dict[int, int] = {}
        with open(self.args.results, "rb") as f:
            offset = 0
            for raw in f:
                offsets[int(json.loads(raw)["line"])] = offset
                offset += len(raw)
            tmp = self.args.output.with_suffix(".tmp")
            with open(tmp, "wb") as out:
                for line, _ in self.index:
                    f.seek(offsets[line])
                    out.write(f.readline())
        os.replace(tmp, self.args.output)

    def run(self) -> int:
        if self.outstanding == 0:
            self.stop()
        threads = [
            threading.Thread(target=self.work, args=(server,), daemon=True)
            for server in self.servers
            for _ in range(self.args.concurrency)
        ]
        for thread in threads:
            thread.start()
        while not self.stopping.wait(1.0):
            self.results.sync()
            self.progress("running")
        for thread in threads:
            thread.join(timeout=self.args.timeout + 5)
        self.results.sync()
        complete = len(self.results.done) == self.total
        if complete and self.args.output:
            self.write_output()
        self.progress("finished" if complete else "stopped")
        return 0 if complete else 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--progress", type=Path, required=True)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--server", action="append", required=True, help="http://HOST:PORT; once per replica")
    parser.add_argument("--key-file", type=Path, required=True)
    parser.add_argument("--model", required=True, help="the name the servers answer to")
    parser.add_argument(
        "--base-weights", action="store_true",
        help="a llama-server that loaded LoRA adapters: ask for none (a slot keeps the adapters of its last request)",
    )  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight per server")
    parser.add_argument("--attempts", type=int, default=4, help="tries per request for errors that may pass")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for one answer")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    runner = Runner(parse_args(argv))
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    signal.signal(signal.SIGINT, lambda *_: runner.stop())
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
