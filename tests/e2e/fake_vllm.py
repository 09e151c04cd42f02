#!/usr/bin/env python3
"""Stands in for vLLM's OpenAI server until the real one runs in the tests: takes `serve MODEL ... --uds SOCKET` and
answers every route, as vLLM answers /invocations, /tokenize, /pooling and others, with no key asked (the key proxy in
front must ask). /health is 200 once "loaded". Python standard library only."""

import json
import socketserver
import sys
import time
from http.server import BaseHTTPRequestHandler

args = sys.argv[1:]
if "--uds" not in args or "--host" in args or "--port" in args:
    sys.exit("fake vllm: the job must start it on --uds only")
SOCKET, NAME = args[args.index("--uds") + 1], args[args.index("--served-model-name") + 1]


class Handler(BaseHTTPRequestHandler):
    def reply(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body: dict[str, object] = {"route": self.path, "unauthenticated": True}
        if self.path == "/v1/models":
            body = {"object": "list", "data": [{"id": NAME, "object": "model"}]}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = reply

    def log_message(self, *args: object) -> None:
        pass


class Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


time.sleep(1)  # vLLM takes a while before it answers its health check
print(f"fake vllm: serving {NAME} on {SOCKET}", flush=True)
Server(SOCKET, Handler).serve_forever()
