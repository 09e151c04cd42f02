"""Personal API tokens for scripts."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.views.decorators.debug import sensitive_variables


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class HashedToken(models.Model):
    """A bearer token of which only the SHA-256 is stored: it is shown once, when issued."""

    PREFIX = ""
    HINT_CHARS = 6  # shown after the prefix, to tell tokens apart

    digest = models.CharField(max_length=64, unique=True, editable=False)
    hint = models.CharField(
        max_length=24, editable=False, help_text="The token's first characters, to tell tokens apart."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True
        ordering = ["-created_at"]

    @classmethod
    @sensitive_variables("token")
    def new_token(cls) -> tuple[str, dict[str, str]]:
        """A fresh token and the columns that stand for it."""
        token = cls.PREFIX + secrets.token_urlsafe(32)
        return token, {"digest": token_digest(token), "hint": token[: len(cls.PREFIX) + cls.HINT_CHARS]}


class ApiToken(HashedToken):
    """A personal token for scripts (the openai client's api_key)."""

    PREFIX = "hpcllm_"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    hint = models.CharField(
        max_length=16, editable=False, help_text="The token's first characters, to tell tokens apart."
    )

    class Meta(HashedToken.Meta):
        pass

    def __str__(self) -> str:
        return f"{self.name} ({self.hint}…)"

    @classmethod
    @sensitive_variables("token")
    def issue(cls, user: User, name: str) -> tuple[ApiToken, str]:
        """A new token; the plain text is returned once and never stored. A ValidationError when the user already
        holds PORTAL_MAX_API_TOKENS_PER_USER tokens in force (their user row is locked meanwhile, so two at once
        cannot both take the last place)."""
        with transaction.atomic():
            get_user_model().objects.select_for_update().filter(pk=user.pk).first()
            held = cls.objects.filter(user=user, revoked_at__isnull=True).count()
            if held >= settings.PORTAL_MAX_API_TOKENS_PER_USER:
                raise ValidationError(
                    f"{user.get_username()} already holds {held} API tokens in force, the most one user may; revoke "
                    "one that is no longer used first."
                )
            token, columns = cls.new_token()
            return cls.objects.create(user=user, name=name, **columns), token


class ScrapeToken(HashedToken):
    """A token an admin issues to a Prometheus server for /metrics."""

    PREFIX = "hpcllm_scrape_"
    HINT_CHARS = 4

    name = models.CharField(max_length=100, help_text="Which Prometheus server holds it.")

    class Meta(HashedToken.Meta):
        pass

    def __str__(self) -> str:
        return f"{self.name} ({self.hint}…)"

    @classmethod
    @sensitive_variables("token")
    def issue(cls, name: str) -> tuple[ScrapeToken, str]:
        token, columns = cls.new_token()
        return cls.objects.create(name=name, **columns), token

    @classmethod
    @sensitive_variables("token")
    def holder(cls, token: str) -> ScrapeToken | None:
        if not token.startswith(cls.PREFIX):
            return None
        return cls.objects.filter(digest=token_digest(token), revoked_at__isnull=True).first()
