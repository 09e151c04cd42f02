"""Encryption at rest for secrets the portal must read back (SSH private keys, per-session backend API keys).

Keys come from settings.PORTAL_ENCRYPTION_KEYS (Fernet keys; the first encrypts, all decrypt, so keys can be
rotated). Without them, one key is derived from SECRET_KEY with HKDF, which keeps a single-host install working
with no setup. Production sites should set their own key and keep it off the database host, so that a database
dump alone reveals nothing.
"""

from __future__ import annotations

import base64
from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings


class DecryptionError(Exception):
    """The stored value was encrypted with a key the portal no longer has, or was altered."""


def _derived_key(secret: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"hpc-llm-portal", info=b"field encryption v1")
    return base64.urlsafe_b64encode(hkdf.derive(secret.encode()))


@cache
def _fernet(keys: tuple[str, ...], secret_key: str) -> MultiFernet:
    if keys:
        return MultiFernet([Fernet(key.encode()) for key in keys])
    return MultiFernet([Fernet(_derived_key(secret_key))])


def _current() -> MultiFernet:
    return _fernet(tuple(getattr(settings, "PORTAL_ENCRYPTION_KEYS", ())), settings.SECRET_KEY)


def encrypt(plaintext: str) -> str:
    return _current().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _current().decrypt(token.encode()).decode()
    except InvalidToken:
        raise DecryptionError(
            "cannot decrypt a stored secret: PORTAL_ENCRYPTION_KEYS (or SECRET_KEY) changed without keeping the old key"
        ) from None
