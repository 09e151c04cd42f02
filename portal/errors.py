"""Validation errors as people read them: one line per message, led by its field, on pages and command lines."""

from __future__ import annotations

from django.core.exceptions import ValidationError


def messages_of(error: ValidationError) -> list[str]:
    if not hasattr(error, "error_dict"):
        return list(error.messages)
    return [
        message if field == "__all__" else f"{field}: {message}"
        for field, errors in error.error_dict.items()
        for item in errors
        for message in item.messages
    ]


def text_of(error: ValidationError) -> str:
    """All of it on one line, for a command's error."""
    return "; ".join(messages_of(error))
