"""Encryption at rest for secrets the portal must read back (SSH private keys, per-session backend API keys).

Keys come from settings.PORTAL_ENCRYPTION_KEYS (Fernet keys; the first encrypts, all decrypt, so keys can be
rotated). Without them, one key is derived from SECRET_KEY with HKDF, which keeps a single-host install working
with no setup. Production sites should set their own key and keep it off the database host, so that a database
dump alone reveals nothing.

Nothing is lost on the way: the keys derived from SECRET_KEY and SECRET_KEY_FALLBACKS always decrypt too, so adding
PORTAL_ENCRYPTION_KEYS to an install, or changing SECRET_KEY with the old one in SECRET_KEY_FALLBACKS, keeps every
stored secret readable. `manage.py reencrypt` then seals every secret column (SealedTextField) under the first key,
after which an old key can be retired.
"""

from __future__ import annotations

import base64
from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.db import models
from django.views.decorators.debug import sensitive_variables


class DecryptionError(Exception):
    """The stored value was encrypted with a key the portal no longer has, or was altered."""


@sensitive_variables("secret", "hkdf")
def _derived_key(secret: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"hpc-llm-portal", info=b"field encryption v1")
    return base64.urlsafe_b64encode(hkdf.derive(secret.encode()))


class SealedTextField(models.TextField):  # type: ignore[type-arg]
    """A column that holds a secret as encrypt() sealed it; `manage.py reencrypt` finds every one by this class."""


@cache
def _fernet(keys: tuple[str, ...], secrets: tuple[str, ...]) -> MultiFernet:
    """The first configured key encrypts (else the key derived from SECRET_KEY); every key decrypts."""
    derived = [Fernet(_derived_key(secret)) for secret in secrets]
    return MultiFernet([Fernet(key.encode()) for key in keys] + derived)


def _current() -> MultiFernet:
    secrets = (settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", ()))
    return _fernet(tuple(getattr(settings, "PORTAL_ENCRYPTION_KEYS", ())), secrets)


@sensitive_variables("plaintext")
def encrypt(plaintext: str) -> str:
    return _current().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _current().decrypt(token.encode()).decode()
    except InvalidToken:
        raise DecryptionError(
            "cannot decrypt a stored secret: PORTAL_ENCRYPTION_KEYS (or SECRET_KEY) changed without keeping the old "
            "key (in PORTAL_ENCRYPTION_KEYS, or SECRET_KEY_FALLBACKS)"
        ) from None


def reseal(token: str) -> str:
    """The same secret sealed under the first key (raises DecryptionError when no configured key opens it)."""
    try:
        return _current().rotate(token.encode()).decode()
    except InvalidToken:
        raise DecryptionError("no configured key decrypts this secret") from None
