"""A request's affinity key: what requests that share a prompt prefix have in common, so that they go to the replica
whose server already holds that prefix in its prompt cache (replicas.choose). Plain Python over the request's JSON.

- A caller's explicit `prompt_cache_key` (OpenAI's field for exactly this: requests that share a long prefix name the
  same key) wins.
- Chat Completions and Anthropic's Messages: the system prompt and the first message after it. A conversation's later
  turns repeat them, so every turn of one conversation goes to the same replica, and so do requests of a script that
  share a long system prompt.
- Responses: its instructions and first input item.
- Completions: the first PREFIX_CHARS characters of the prompt (a shared preamble, a few-shot block).
- Embeddings and the rest: none (no prompt cache to reuse), so the least loaded replica.

The key is a digest: nothing of the prompt is kept or shown.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

PREFIX_CHARS = 2000  # about 500 tokens of a completion prompt: past a typical shared preamble, short of its question


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
        system = payload.get("system")  # Anthropic's system prompt is a field of its own
        head = _leading(messages)
        return _digest(["chat", system, head]) if head or system else ""
    if route == "responses":
        given = payload.get("input")
        first = given[:PREFIX_CHARS] if isinstance(given, str) else given[:1] if isinstance(given, list) else None
        instructions = payload.get("instructions")
        return _digest(["responses", instructions, first]) if instructions or first else ""
    if route == "completions":
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        return _digest(["completions", prompt[:PREFIX_CHARS]]) if isinstance(prompt, str) and prompt else ""
    return ""


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
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
