"""Encryption at rest: rotated keys still decrypt, and a lost key says so."""

from __future__ import annotations

from typing import Any

import pytest

from portal import crypto


def test_secrets_encrypted_under_a_lost_key_say_so(settings: Any) -> None:
    token = crypto.encrypt("secret")
    settings.PORTAL_ENCRYPTION_KEYS = ["x" * 43 + "="]
    with pytest.raises(crypto.DecryptionError, match="PORTAL_ENCRYPTION_KEYS"):
        crypto.decrypt(token)


def test_rotated_keys_still_decrypt_old_values(settings: Any) -> None:
    from cryptography.fernet import Fernet

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.PORTAL_ENCRYPTION_KEYS = [old]
    token = crypto.encrypt("secret")
    settings.PORTAL_ENCRYPTION_KEYS = [new, old]
    assert crypto.decrypt(token) == "secret"
