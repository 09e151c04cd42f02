"""A small real HTTP server that answers chat completions as llama-server does, fails on purpose or slows down: the
model server of the batch runner's and the supervisor's tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KEY = "sk-hpcllm-batch-test"


class Model(BaseHTTPRequestHandler):
    """Answers a chat completion with the prompt upper-cased; a prompt starting "FAIL" gets 400, "FLAKY" 503 on its
    first two tries; `delay_s` slows every answer (for the kill test)."""

    delay_s = 0.0
    seen: list[dict[str, Any]] = []
    tries: dict[str, int] = {}
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with Model.lock:
            Model.seen.append({"auth": self.headers.get("Authorization"), **body})
            Model.tries[prompt] = Model.tries.get(prompt, 0) + 1
            tries = Model.tries[prompt]
        time.sleep(Model.delay_s)
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            self.answer(401, {"error": "invalid API key"})
        elif prompt.startswith("FAIL"):
            self.answer(400, {"error": {"message": "the prompt is too long"}})
        elif prompt.startswith("FLAKY") and tries <= 2:
            self.answer(503, {"error": "loading"})
        else:
            self.answer(200, {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": prompt.upper()},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            })  # fmt: skip

    def answer(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serving() -> Iterator[str]:
    """A fresh model server on a loopback port; its URL."""
    Model.delay_s, Model.seen, Model.tries = 0.0, [], {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Model)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
