#!/usr/bin/env python3
"""What a session's owner could run in their own job instead of a model server: it answers its health check, then
serves HTML with script on the OpenAI routes (and a page as an error on /v1/completions). Takes llama-server's
--host and --port and ignores the rest."""

import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

PAGE = b"<html><body><script>fetch('/admin/').then(r => r.text()).then(alert)</script>portal look-alike</body></html>"


class Handler(BaseHTTPRequestHandler):
    def reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self.reply(200, "application/json", b'{"status": "ok"}')
        else:
            self.reply(200, "text/html", PAGE)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.reply(500 if self.path == "/v1/completions" else 200, "text/html; charset=utf-8", PAGE)

    def log_message(self, *args: object) -> None:
        pass


args = sys.argv[1:]
host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
HTTPServer((host, port), Handler).serve_forever()
