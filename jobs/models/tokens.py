"""Personal API tokens for scripts."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.contrib.auth.models import User
from django.db import models
from django.views.decorators.debug import sensitive_variables


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ApiToken(models.Model):
    """A personal token for scripts (the openai client's api_key). Only its SHA-256 is stored; it is shown once."""

    PREFIX = "hpcllm_"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    hint = models.CharField(
        max_length=16, editable=False, help_text="The token's first characters, to tell tokens apart."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.hint}…)"

    @classmethod
    @sensitive_variables("token")
    def issue(cls, user: User, name: str) -> tuple[ApiToken, str]:
        """A new token; the plain text is returned once and never stored."""
        token = cls.PREFIX + secrets.token_urlsafe(32)
        row = cls.objects.create(user=user, name=name, digest=token_digest(token), hint=token[: len(cls.PREFIX) + 6])
        return row, token
