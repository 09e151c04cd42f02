"""Run `transformers serve` on a Unix socket, with its quirks fixed, for the transformers runtime's job.

`transformers serve` listens only on a TCP host and port and has no API key at all, so on its own anyone who can
reach the port could use it. This starts the same command in-process with uvicorn told to listen on a Unix socket in
the job's private (0700) directory instead; keyproxy.py in front checks the session's key. Two quirks are fixed on
the way out, so that clients written for OpenAI's API work unchanged:

* a streamed chat or completion reply ends with `data: [DONE]`, which OpenAI's API sends and `transformers serve`
  does not;
* GET /v1/models lists the model the session serves (it answers an error, or nothing, where no Hugging Face cache
  directory is set up);
* the model a request names is the session's (a server started for one model refuses any other name than the
  path it was started with).

Run by the Python of the environment that has transformers[serving] (the cluster's binary for this runtime):
    python tfserve.py --socket PATH --served-name NAME -- MODEL_DIR [transformers serve options]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

DONE = b"data: [DONE]\n\n"
# The peak of what torch allocated on each GPU, printed to the job's log when it grows: the portal reads it as the
# session's measured total where nvidia-smi says nothing (jobs/cluster/measured.py TORCH_PEAK_LINE).
TORCH_PEAK_LINE = "tfserve: torch.cuda.max_memory_allocated MiB:"


def torch_peak_mib() -> list[int]:
    """torch.cuda.max_memory_allocated of each GPU in MiB; empty without torch loaded or without CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    return [int(torch.cuda.max_memory_allocated(i)) >> 20 for i in range(torch.cuda.device_count())]


class OpenAIShape:
    """ASGI middleware: the two fixes above; everything else passes through untouched."""

    def __init__(self, app: App, served_name: str, model: str) -> None:
        self.app = app
        self.served_name = served_name
        self.model = model
        self.created = int(time.time())
        self.peak_mib = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "GET" and scope["path"].rstrip("/") == "/v1/models":
            await self._models(send)
            return
        if scope["method"] == "POST":
            scope, receive = await self._pinned(scope, receive)
        # OpenAI ends only its chat and completions streams with [DONE]; the Responses API's end with an event.
        streaming, ends_done = False, scope["path"].rstrip("/") in ("/v1/chat/completions", "/v1/completions")
        tail = b""

        async def send_fixed(message: Message) -> None:
            nonlocal streaming, tail
            if message["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and streaming and ends_done:
                body = message.get("body", b"")
                tail = (tail + body)[-len(DONE) :]
                if not message.get("more_body", False) and not tail.endswith(DONE):
                    message = {**message, "body": body + DONE}
            await send(message)

        await self.app(scope, receive, send_fixed)
        self._log_peak()

    def _log_peak(self) -> None:
        peaks = torch_peak_mib()
        if sum(peaks) > self.peak_mib:
            self.peak_mib = sum(peaks)
            print(TORCH_PEAK_LINE, ", ".join(map(str, peaks)), flush=True)

    async def _pinned(self, scope: Scope, receive: Receive) -> tuple[Scope, Receive]:
        """The request with its JSON body's model set to the one the server was started with."""
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return scope, receive  # the client went away
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if isinstance(payload, dict) and "model" in payload:
            payload["model"] = self.model
            body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return scope, replay

    async def _models(self, send: Send) -> None:
        body = json.dumps(
            {
                "object": "list",
                "data": [{"id": self.served_name, "object": "model", "created": self.created, "owned_by": "you"}],
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--served-name", required=True)
    parser.add_argument("serve_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    if any(a.split("=")[0] in {"--host", "--port"} for a in serve_args):
        sys.exit("tfserve: the server listens on the private socket only; leave out --host and --port")
    if not serve_args or serve_args[0].startswith("-"):
        sys.exit("tfserve: name the model directory first after --")

    import uvicorn

    # Imported by name: the environment that runs this has transformers; the portal's own does not.
    transformers_cli = importlib.import_module("transformers.cli.transformers")

    # `transformers serve` builds a uvicorn.Config(app, host=..., port=...): the socket replaces the address, and
    # the app gets the fixes above. Should a release stop doing it this way, the job fails: no socket ever appears.
    original_init = uvicorn.Config.__init__

    def on_socket(self: uvicorn.Config, app: Any, *rest: Any, **options: Any) -> None:
        options.pop("host", None)
        options.pop("port", None)
        options["uds"] = args.socket
        original_init(self, OpenAIShape(app, args.served_name, serve_args[0]), *rest, **options)

    uvicorn.Config.__init__ = on_socket  # type: ignore[method-assign]
    sys.argv = ["transformers", "serve", *serve_args]
    transformers_cli.main()


if __name__ == "__main__":
    main()
