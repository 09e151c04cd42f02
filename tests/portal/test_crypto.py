"""Encryption at rest: rotated keys still decrypt, and a lost key says so."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.core.management.base import CommandError

from catalog.models import ClusterAccount
from jobs.sessions.actions import launch
from portal import crypto
from tests.conftest import LAUNCH


def test_secrets_encrypted_under_a_lost_key_say_so(settings: Any) -> None:
    settings.PORTAL_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    token = crypto.encrypt("secret")
    settings.PORTAL_ENCRYPTION_KEYS = ["x" * 43 + "="]  # the key that sealed it was dropped
    with pytest.raises(crypto.DecryptionError, match="PORTAL_ENCRYPTION_KEYS"):
        crypto.decrypt(token)


def test_rotated_keys_still_decrypt_old_values(settings: Any) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.PORTAL_ENCRYPTION_KEYS = [old]
    token = crypto.encrypt("secret")
    settings.PORTAL_ENCRYPTION_KEYS = [new, old]
    assert crypto.decrypt(token) == "secret"


def test_adding_encryption_keys_keeps_secrets_sealed_under_the_derived_key(settings: Any) -> None:
    settings.PORTAL_ENCRYPTION_KEYS = []
    token = crypto.encrypt("secret")  # under the key derived from SECRET_KEY
    settings.PORTAL_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    assert crypto.decrypt(token) == "secret"


def test_a_changed_secret_key_loses_nothing_with_the_old_one_in_fallbacks(settings: Any) -> None:
    settings.PORTAL_ENCRYPTION_KEYS = []
    token = crypto.encrypt("secret")
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "a new secret key " * 4, [settings.SECRET_KEY]
    assert crypto.decrypt(token) == "secret"
    settings.SECRET_KEY_FALLBACKS = []
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt(token)


@pytest.mark.django_db
def test_reencrypt_seals_every_secret_under_the_first_key_so_old_keys_can_go(
    settings: Any, account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.PORTAL_ENCRYPTION_KEYS = []
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, LAUNCH)
    private_key, api_key = account.ssh_target().private_key, session.api_key
    new = Fernet.generate_key().decode()
    settings.PORTAL_ENCRYPTION_KEYS = [new]
    out = StringIO()
    call_command("reencrypt", stdout=out)
    assert "2 secrets were sealed" in out.getvalue()
    settings.SECRET_KEY, settings.PORTAL_ENCRYPTION_KEYS = "another secret key " * 4, [new]  # the old keys are gone
    account.refresh_from_db()
    session.refresh_from_db()
    assert (account.ssh_target().private_key, session.api_key) == (private_key, api_key)
    assert Fernet(new.encode()).decrypt(session.api_key_encrypted.encode()).decode() == api_key


@pytest.mark.django_db
def test_reencrypt_says_which_secrets_no_key_opens_and_leaves_them(
    settings: Any, account: ClusterAccount, owner: Any
) -> None:
    ClusterAccount.objects.filter(pk=account.pk).update(private_key_encrypted="not a token")
    with pytest.raises(CommandError, match=f"catalog.ClusterAccount {account.pk}"):
        call_command("reencrypt", stdout=StringIO())
    assert ClusterAccount.objects.get(pk=account.pk).private_key_encrypted == "not a token"
