"""HTTP requests the portal makes outside the proxy's stream: a session's health check, the chat's plain-form ask, the
text of a model server's error. Two rules for every one of them:

- **Straight to the address**, built from its parts by the caller: never through a proxy the environment names
  (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, as a site's outbound proxy is often set for the whole host). A proxy would see
  the session's key in the Authorization header, could answer for the server, and would make the request from
  wherever it sits: httpx trusts those variables unless told not to (trust_env=False).
- **Bounded replies**: at most max_bytes of the body as it decodes (a small gzip reply that inflates counts as what it
  inflates to), and ReplyTooLarge past it, before more is read. A model server is the session owner's, and a reply
  read whole would be the portal's memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

MAX_REPLY_BYTES = 16 * 1024 * 1024  # a chat completion of a long context is a few hundred KiB


class ReplyTooLarge(httpx.HTTPError):
    """The reply's body is larger than the caller takes (an httpx.HTTPError, so callers' error paths catch it)."""

    def __init__(self, request: httpx.Request, max_bytes: int) -> None:
        super().__init__(f"the reply is larger than {max_bytes:,} bytes")
        self.request = request


@dataclass(frozen=True)
class Reply:
    status_code: int
    headers: httpx.Headers
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


def client(timeout: float) -> httpx.Client:
    """A client that ignores the environment's proxies, certificate and .netrc settings."""
    return httpx.Client(trust_env=False, timeout=timeout)


def request(method: str, url: httpx.URL, *, timeout: float, max_bytes: int = MAX_REPLY_BYTES, **kwargs: Any) -> Reply:
    """One request, straight to `url`, its reply read whole up to max_bytes (ReplyTooLarge past them)."""
    with client(timeout) as http, http.stream(method, url, **kwargs) as response:
        return Reply(response.status_code, response.headers, read_at_most(response, max_bytes))


def _declared_too_large(response: httpx.Response, max_bytes: int) -> bool:
    declared = response.headers.get("content-length", "")
    # The declared length counts encoded bytes; what it decodes to is counted as it is read.
    return declared.isdigit() and "content-encoding" not in response.headers and int(declared) > max_bytes


def read_at_most(response: httpx.Response, max_bytes: int) -> bytes:
    """A streamed reply's body, refused as soon as it passes max_bytes (decoded)."""
    if _declared_too_large(response, max_bytes):
        raise ReplyTooLarge(response.request, max_bytes)
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise ReplyTooLarge(response.request, max_bytes)
    return bytes(body)


async def read_start(response: httpx.Response, n: int) -> bytes:
    """The first n bytes of a streamed reply's body (decoded), for a message that quotes it; the rest is never read."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= n:
            break
    return bytes(body[:n])
