"""A request's affinity key: what requests that share a prompt prefix have in common, so that they go to the replica
whose server already holds that prefix in its prompt cache (replicas.choose). Plain Python over the request's JSON.

- A caller's explicit `prompt_cache_key` (OpenAI's field for exactly this: requests that share a long prefix name the
  same key) wins.
- Otherwise the first PREFIX_CHARS characters of the prompt's head, as the server will see it in order (KubeAI's
  prefix-hash rule): for Chat Completions and Anthropic's Messages the system prompt and the first message after it;
  for Responses the instructions and first input; for Completions the prompt. A conversation's later turns repeat its
  head, so every turn goes to the same replica. Requests that share a system prompt longer than PREFIX_CHARS share a
  key whatever they ask (a script's long instructions, a few-shot block); with a shorter one the first question is
  part of the key, so the conversations of a chat with a short fixed system prompt spread over the replicas instead of
  piling onto one. (The bound on loads spreads a hot key anyway.)
- Embeddings and the rest: none (no prompt cache to reuse), so the least loaded replica.

The key is a digest: nothing of the prompt is kept or shown.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

PREFIX_CHARS = 2000  # about 500 tokens: past a typical chat's system prompt, short of a long shared preamble's end


def key_of(route: str, payload: Any) -> str:
    """The affinity key of an API request (`route`: catalog.runtime_rules' route name), or "" for none."""
    if not isinstance(payload, dict):
        return ""
    explicit = payload.get("prompt_cache_key")
    if isinstance(explicit, str) and explicit:
        return _digest(["key", explicit])
    if route in ("chat/completions", "messages"):
        messages = payload.get("messages")
        if not isinstance(messages, list):
            return ""
        head = [payload.get("system"), *_leading(messages)]  # Anthropic's system prompt is a field of its own
    elif route == "responses":
        given = payload.get("input")
        head = [payload.get("instructions"), given[:1] if isinstance(given, list) else given]
    elif route == "completions":
        prompt = payload.get("prompt")
        head = [prompt[0] if isinstance(prompt, list) and prompt else prompt]
    else:
        return ""
    text = "".join(_text(part) for part in head)
    return _digest([route.split("/")[0], text[:PREFIX_CHARS]]) if text else ""


def _text(part: Any) -> str:
    """What of a part of the prompt's head counts: a string as it is, a message by its role and content (content
    blocks as their JSON), a list (of blocks, of input items) as its JSON; nothing else."""
    if isinstance(part, str):
        return part
    if isinstance(part, dict):
        if "role" not in part or "content" not in part:
            return ""
        content = part["content"]
        return f"<{part['role']}>" + (content if isinstance(content, str) else _json(content))
    return _json(part) if isinstance(part, list) and part else ""


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def conversation_key(conversation: str) -> str:
    """The browser chat's key: its conversation, whatever its messages."""
    return _digest(["conversation", conversation])


def _leading(messages: list[Any]) -> list[Any]:
    """The system (or developer) messages at the start and the first message after them."""
    head: list[Any] = []
    for message in messages:
        head.append(message)
        if not (isinstance(message, dict) and message.get("role") in ("system", "developer")):
            break
    return head


def _digest(parts: list[Any]) -> str:
    return hashlib.blake2b(_json(parts).encode(), digest_size=16).hexdigest()
