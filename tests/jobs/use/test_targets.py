"""The proxy's per-request lookup (plain SQL): the same rules as the pages, on SQLite and on PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone

from catalog.models import ClusterAccount, ModelVariant, VariantLocation
from jobs.models import ApiToken, LLMSession, State, transition
from jobs.sessions.actions import launch
from jobs.use import targets
from portal import crypto
from tests.conftest import LAUNCH

pytestmark = pytest.mark.django_db


@pytest.fixture
def start(account: ClusterAccount, django_capture_on_commit_callbacks: Any) -> Any:
    def started(owner: Any, alias: str = "", state: State = State.RUNNING, port: int = 8080) -> LLMSession:
        if owner != account.user:
            ClusterAccount.objects.get_or_create(cluster=account.cluster, user=owner, defaults={"username": "x"})
        with django_capture_on_commit_callbacks(execute=False):
            session = launch(owner, LAUNCH)
        transition(session.pk, state, cause="test", host="127.0.0.7", port=port)
        LLMSession.objects.filter(pk=session.pk).update(alias=alias)
        return LLMSession.objects.get(pk=session.pk)

    return started


def holder_of(user: Any) -> targets.Holder:
    return targets.Holder(user.pk)  # as the browser's route builds it: the permission is looked up when needed


def test_a_token_names_its_active_holder_until_revoked(owner: Any) -> None:
    row, token = ApiToken.issue(owner, "laptop")
    assert targets.holder(token) == targets.Holder(owner.pk, sees_all=False)
    assert targets.holder(token + "x") is None
    assert targets.holder("sk-" + token) is None
    owner.is_active = False
    owner.save()
    assert targets.holder(token) is None
    owner.is_active = True
    owner.save()
    ApiToken.objects.filter(pk=row.pk).update(revoked_at=timezone.now())
    assert targets.holder(token) is None


def test_token_use_is_noted_once_a_minute(owner: Any) -> None:
    row, token = ApiToken.issue(owner, "laptop")
    targets.holder(token)
    first = ApiToken.objects.get(pk=row.pk).last_used_at
    assert first is not None and timezone.now() - first < timedelta(seconds=5)
    targets.holder(token)
    assert ApiToken.objects.get(pk=row.pk).last_used_at == first
    ApiToken.objects.filter(pk=row.pk).update(last_used_at=first - timedelta(minutes=2))
    targets.holder(token)
    noted = ApiToken.objects.get(pk=row.pk).last_used_at
    assert noted is not None and noted > first - timedelta(seconds=1)


def test_the_owner_reaches_a_running_session_by_uuid_and_alias(start: Any, owner: Any) -> None:
    session = start(owner, alias="mistral")
    for key in (str(session.pk), "mistral"):
        found = targets.target(holder_of(owner), key)
        assert found == targets.Target(
            pk=str(session.pk),
            state=State.RUNNING,
            base=httpx.URL("http://127.0.0.7:8080"),
            key=crypto.decrypt(session.api_key_encrypted),
            served_model=session.served_model_name,
            node_list=session.node_list,
            runtime=session.runtime.kind,
        )


def test_others_do_not_and_support_staff_only_by_uuid(
    start: Any, owner: Any, other_user: Any, admin_user: Any, staff_user: Any, support_user: Any
) -> None:
    session = start(owner, alias="mistral")
    for nobody in (other_user, staff_user):  # being staff is not enough
        assert targets.target(holder_of(nobody), str(session.pk)) is None
        assert targets.target(holder_of(nobody), "mistral") is None
    for support in (support_user, admin_user):  # the permission, through the group or as a superuser
        assert targets.target(holder_of(support), str(session.pk)) is not None
        assert targets.target(holder_of(support), "mistral") is None  # aliases are per user


def test_a_tokens_holder_carries_the_support_permission(owner: Any, staff_user: Any, support_user: Any) -> None:
    """The API's lookup decides the permission in its one statement, as has_perm() does."""
    for user, expected in ((owner, False), (staff_user, False), (support_user, True)):
        _, token = ApiToken.issue(user, "script")
        assert targets.holder(token) == targets.Holder(user.pk, sees_all=expected)
    support_user.groups.clear()
    support_user.user_permissions.add(Permission.objects.get(codename="see_all_sessions"))  # given directly
    _, token = ApiToken.issue(support_user, "direct")
    assert targets.holder(token) == targets.Holder(support_user.pk, sees_all=True)
    assert targets.target(holder_of(owner), str(uuid.uuid4())) is None
    assert targets.target(holder_of(owner), "no-such-alias") is None


def test_an_alias_names_the_newest_live_session(start: Any, owner: Any) -> None:
    older = start(owner, alias="llama", port=8001)
    newer = start(owner, alias="llama", port=8002)
    LLMSession.objects.filter(pk=older.pk).update(created_at=timezone.now() - timedelta(hours=1))
    assert targets.target(holder_of(owner), "llama").pk == str(newer.pk)  # type: ignore[union-attr]
    transition(newer.pk, State.CANCELLED, cause="test")
    assert targets.target(holder_of(owner), "llama").pk == str(older.pk)  # type: ignore[union-attr]
    transition(older.pk, State.COMPLETED, cause="test")
    assert targets.target(holder_of(owner), "llama") is None
    # by uuid an ended session is still found, so the proxy can say which state it is in
    ended = targets.target(holder_of(owner), str(older.pk))
    assert ended is not None and ended.state == State.COMPLETED and ended.base is None and ended.key == ""


def test_a_session_not_running_has_no_address_or_key(start: Any, owner: Any) -> None:
    session = start(owner, state=State.QUEUED)
    found = targets.target(holder_of(owner), str(session.pk))
    assert found is not None and found.state == State.QUEUED and found.base is None and found.key == ""


def test_activity_is_noted_at_most_every_30_seconds(start: Any, owner: Any) -> None:
    session = start(owner)
    assert session.last_activity_at is None
    targets.target(holder_of(owner), str(session.pk))
    first = LLMSession.objects.get(pk=session.pk).last_activity_at
    assert first is not None
    targets.target(holder_of(owner), str(session.pk))
    assert LLMSession.objects.get(pk=session.pk).last_activity_at == first
    LLMSession.objects.filter(pk=session.pk).update(last_activity_at=first - timedelta(minutes=1))
    targets.target(holder_of(owner), str(session.pk))
    noted = LLMSession.objects.get(pk=session.pk).last_activity_at
    assert noted is not None and noted > first - timedelta(seconds=1)


def test_a_model_is_named_by_its_catalog_name_for_the_owners_newest_running_session(
    start: Any, owner: Any, other_user: Any, support_user: Any
) -> None:
    older, newer = start(owner, port=8001), start(owner, port=8002)
    LLMSession.objects.filter(pk=older.pk).update(created_at=timezone.now() - timedelta(hours=1))
    start(owner, state=State.QUEUED, port=8003)  # not running: never named
    for name in ("tiny-llama", "tiny-llama:fp16"):
        assert targets.target(holder_of(owner), name).pk == str(newer.pk)  # type: ignore[union-attr]
    assert targets.target(holder_of(owner), "tiny-llama:Q4_0") is None
    assert targets.target(holder_of(owner), "Tiny-Llama") is None  # the catalog's spelling
    for someone_else in (other_user, support_user):  # names are the caller's own sessions', support's too
        assert targets.target(holder_of(someone_else), "tiny-llama") is None
    transition(newer.pk, State.CANCELLED, cause="test")
    assert targets.target(holder_of(owner), "tiny-llama").pk == str(older.pk)  # type: ignore[union-attr]


def test_a_name_that_runs_in_several_quantisations_is_a_question_not_a_guess(start: Any, owner: Any) -> None:
    f16 = start(owner, port=8001)
    q8 = ModelVariant.objects.create(model=f16.variant.model, quantization="Q8_0", format="gguf", size_gib=0.0001)
    VariantLocation.objects.create(variant=q8, cluster=f16.cluster, path="/models/tiny-q8.gguf")
    other = start(owner, port=8002)
    LLMSession.objects.filter(pk=other.pk).update(variant=q8)
    with pytest.raises(targets.Ambiguous, match="name one as tiny-llama:Q8_0 or tiny-llama:fp16"):
        targets.target(holder_of(owner), "tiny-llama")
    assert targets.target(holder_of(owner), "tiny-llama:Q8_0").pk == str(other.pk)  # type: ignore[union-attr]
    assert targets.target(holder_of(owner), "tiny-llama:fp16").pk == str(f16.pk)  # type: ignore[union-attr]


def test_every_name_the_models_list_offers_names_the_session_it_says(start: Any, owner: Any) -> None:
    from jobs.use.proxy import _running_models

    first = start(owner, alias="chat", port=8001)
    second = start(owner, port=8002)
    listed = {entry["id"]: entry["session"] for entry in _running_models(owner.pk)}
    assert listed == {
        "chat": str(first.pk), str(second.pk): str(second.pk),
        "tiny-llama": str(second.pk), "tiny-llama:fp16": str(second.pk),
    }  # fmt: skip
    for name, session in listed.items():
        assert targets.target(holder_of(owner), name).pk == session  # type: ignore[union-attr]
