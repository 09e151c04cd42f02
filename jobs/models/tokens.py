"""Personal API tokens for scripts."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from datetime import datetime

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from portal.shellsafe import CALLER_MODEL_NAME


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
    # A scoped token (issue 29): only these model names (as the caller spells them: a service's name, a session's
    # alias or uuid, a catalog name, owner/alias), until its expiry, at its own rate. Empty, None: no such limit.
    allowed_models = models.JSONField(default=list, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)

    class Meta(HashedToken.Meta):
        pass

    def __str__(self) -> str:
        return f"{self.name} ({self.hint}…)"

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    def describe(self) -> str:
        """Its state and scope in a line: active or revoked or expired, the models, the expiry, its own rate."""
        if self.revoked_at:
            return f"revoked {timezone.localtime(self.revoked_at):%Y-%m-%d}"
        parts = [f"expired {timezone.localtime(self.expires_at):%Y-%m-%d %H:%M}" if self.expired and self.expires_at
                 else "active"]  # fmt: skip
        if self.allowed_models:
            parts.append("only " + ", ".join(self.allowed_models))
        if self.expires_at and not self.expired:
            parts.append(f"until {timezone.localtime(self.expires_at):%Y-%m-%d %H:%M}")
        if self.requests_per_minute:
            parts.append(f"{self.requests_per_minute} requests a minute")
        return "; ".join(parts)

    @classmethod
    @sensitive_variables("token")
    def issue(
        cls, user: User, name: str, *, allowed_models: Iterable[str] = (), expires_at: datetime | None = None,
        requests_per_minute: int | None = None,
    ) -> tuple[ApiToken, str]:  # fmt: skip
        """A new token; the plain text is returned once and never stored. A ValidationError when the user already
        holds PORTAL_MAX_API_TOKENS_PER_USER tokens in force (their user row is locked meanwhile, so two at once
        cannot both take the last place), or when its scope is not one a token can have (check_scope)."""
        allowed = check_scope(allowed_models, expires_at, requests_per_minute)
        with transaction.atomic():
            get_user_model().objects.select_for_update().filter(pk=user.pk).first()
            held = cls.objects.filter(user=user, revoked_at__isnull=True).count()
            if held >= settings.PORTAL_MAX_API_TOKENS_PER_USER:
                raise ValidationError(
                    f"{user.get_username()} already holds {held} API tokens in force, the most one user may; revoke "
                    "one that is no longer used first."
                )
            token, columns = cls.new_token()
            made = cls.objects.create(user=user, name=name, allowed_models=allowed, expires_at=expires_at,
                                      requests_per_minute=requests_per_minute, **columns)  # fmt: skip
            return made, token


MAX_ALLOWED_MODELS = 20


def check_scope(
    allowed_models: Iterable[str], expires_at: datetime | None, requests_per_minute: int | None
) -> list[str]:
    """A token's scope as it is stored (its model names, in order, once each), or a ValidationError saying what is
    wrong with it."""
    names = list(dict.fromkeys(name.strip() for name in allowed_models if name.strip()))
    if len(names) > MAX_ALLOWED_MODELS:
        raise ValidationError(f"At most {MAX_ALLOWED_MODELS} model names per token.")
    # Names, not text that could mean anything else where a scope is shown.
    bad = [name for name in names if not CALLER_MODEL_NAME.accepts(name)]
    if bad:
        raise ValidationError(f"Not a model's name: {bad[0][:80]!r} (letters, digits and . _ : / @ + -).")
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError("The expiry must be in the future.")
    site = settings.PORTAL_API_REQUESTS_PER_MINUTE
    if requests_per_minute is not None and not (1 <= requests_per_minute <= (site or requests_per_minute)):
        raise ValidationError(f"A token's own rate is 1 to {site} requests a minute (the site's limit)."
                              if site else "A token's own rate is at least 1 request a minute.")  # fmt: skip
    return names


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
