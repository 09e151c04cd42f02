"""Sharing a session: the grants, who then reaches what (pages, chat, proxy lookups), and revoking and expiry."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs.models import Conversation, LLMSession, ProxyRequest, SessionShare, State, transition
from jobs.sessions.actions import launch
from jobs.use import proxy, targets
from tests.conftest import LAUNCH

pytestmark = pytest.mark.django_db


@pytest.fixture
def running(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> LLMSession:
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, LAUNCH)
    transition(session.pk, State.RUNNING, cause="test", host="127.0.0.7", port=8080, alias="lab-llama")
    return LLMSession.objects.get(pk=session.pk)


def share(client: Client, session: LLMSession, **fields: Any) -> Any:
    data = {"chat": "on", "api": "on", **fields}
    return client.post(f"/sessions/{session.pk}/share", {k: v for k, v in data.items() if v is not None})


def signed_in(client: Client, user: Any) -> Client:
    client.force_login(user)
    return client


def test_the_owner_shares_with_their_lab_and_a_member_chats_in_their_own_conversations(
    client: Client, running: LLMSession, owner: Any, shared_user: Any, lab: Group
) -> None:
    signed_in(client, owner)
    assert share(client, running, group=str(lab.pk), api=None).status_code == 302
    grant = SessionShare.objects.get()
    assert (grant.group, grant.chat, grant.api, grant.created_by) == (lab, True, False, owner)
    mine = Conversation.objects.create(session=running, owner=owner, title="owner's secret plans")
    member = Client()
    signed_in(member, shared_user)
    listing = member.get("/sessions/").content.decode()
    assert "Shared with me" in listing and f"/sessions/{running.pk}/chat/" in listing
    assert member.get(f"/sessions/{running.pk}/chat/").status_code == 200
    assert "owner's secret plans" not in member.get(f"/sessions/{running.pk}/chat/").content.decode()
    assert member.get(f"/sessions/{running.pk}/chat/{mine.pk}/export").status_code == 404
    made = member.post(f"/sessions/{running.pk}/chat/new", headers={"accept": "application/json"}).json()
    theirs = Conversation.objects.get(pk=made["id"])
    assert theirs.owner == shared_user
    assert client.get(f"/sessions/{running.pk}/chat/{theirs.pk}/export").status_code == 404  # the owner neither


def test_those_it_is_shared_with_cannot_manage_the_session(
    client: Client, running: LLMSession, owner: Any, shared_user: Any
) -> None:
    signed_in(client, owner)
    share(client, running, users="alan")
    signed_in(client, shared_user)
    base = f"/sessions/{running.pk}"
    for url in (f"{base}/", f"{base}/card", f"{base}/relaunch", f"{base}/log", f"{base}/batch/new"):
        assert client.get(url).status_code == 404, url
    grant = SessionShare.objects.get()
    for url in (f"{base}/cancel", f"{base}/delete", f"{base}/share", f"{base}/share/{grant.pk}/revoke"):
        assert client.post(url, {"users": "grace"}).status_code == 404, url
    running.refresh_from_db()
    assert running.state == State.RUNNING and SessionShare.objects.get().revoked_at is None


def test_the_proxy_lets_a_grantee_in_by_uuid_and_owner_slash_alias_on_the_routes_granted(
    client: Client, running: LLMSession, owner: Any, shared_user: Any, other_user: Any, lab: Group
) -> None:
    signed_in(client, owner)
    share(client, running, group=str(lab.pk), chat=None)  # API only
    member = targets.Holder(shared_user.pk)
    assert targets.target(member, str(running.pk), "api") is not None
    assert targets.target(member, "ada/lab-llama", "api") is not None
    assert targets.target(member, "lab-llama", "api") is None  # a bare alias names the caller's own sessions
    assert targets.target(member, str(running.pk), "chat") is None
    assert targets.target(member, "ada/lab-llama", "chat") is None
    assert targets.target(targets.Holder(other_user.pk), "ada/lab-llama", "api") is None
    assert targets.target(member, "tiny-llama", "api") is None  # catalog names are the caller's own sessions
    assert targets.target(targets.Holder(other_user.pk), str(running.pk), "api") is None
    shared_user.groups.remove(lab)  # left the lab
    assert targets.target(member, str(running.pk), "api") is None


def test_revoking_or_expiry_ends_access_at_the_next_request(
    client: Client, running: LLMSession, owner: Any, shared_user: Any
) -> None:
    signed_in(client, owner)
    share(client, running, users="alan", days="3")
    grant = SessionShare.objects.get()
    assert grant.expires_at is not None and grant.expires_at > timezone.now() + timedelta(days=2)
    member = targets.Holder(shared_user.pk)
    assert targets.target(member, str(running.pk), "chat") is not None
    SessionShare.objects.filter(pk=grant.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert targets.target(member, str(running.pk), "chat") is None
    SessionShare.objects.filter(pk=grant.pk).update(expires_at=None)
    assert targets.target(member, str(running.pk), "chat") is not None
    client.post(f"/sessions/{running.pk}/share/{grant.pk}/revoke")
    assert targets.target(member, str(running.pk), "chat") is None
    other = Client()
    signed_in(other, shared_user)
    assert other.get(f"/sessions/{running.pk}/chat/").status_code == 404
    assert "Shared with me" not in other.get("/sessions/").content.decode()


def test_a_new_grant_replaces_the_one_in_force_for_the_same_user(
    client: Client, running: LLMSession, owner: Any, shared_user: Any
) -> None:
    signed_in(client, owner)
    share(client, running, users="alan")
    share(client, running, users="alan", chat=None)
    grants = list(SessionShare.objects.order_by("pk"))
    assert len(grants) == 2 and grants[0].revoked_at is not None and grants[1].revoked_at is None
    assert targets.target(targets.Holder(shared_user.pk), str(running.pk), "chat") is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"users": "nobody-here"}, "None of your groups has a member called nobody-here"),
        ({"users": "ada"}, "The session is yours already"),
        ({}, "Name users or choose a group"),
        ({"users": "alan", "chat": None, "api": None}, "Share the chat, the API, or both"),
        ({"users": "alan", "days": "0"}, "greater than or equal to 1"),
    ],
)
def test_bad_grants_are_refused_with_a_reason_and_change_nothing(
    client: Client, running: LLMSession, owner: Any, shared_user: Any, fields: dict[str, Any], message: str
) -> None:
    signed_in(client, owner)
    page = client.get(share(client, running, **fields)["Location"]).content.decode()
    assert message in page and not SessionShare.objects.exists()


def test_the_share_form_answers_alike_for_a_name_nobody_has_and_a_user_outside_the_owners_groups(
    client: Client, running: LLMSession, owner: Any, shared_user: Any, other_user: Any, staff_user: Any
) -> None:
    signed_in(client, owner)

    def answer(name: str) -> list[str]:
        page = client.post(f"/sessions/{running.pk}/share", {"users": name, "chat": "on"}, follow=True)
        return [str(message).replace(name, "NAME") for message in page.context["messages"]]

    assert answer("grace") == answer("nobody-here") == answer("hopper")  # two users outside the lab, and no one
    assert answer("grace") == [
        "None of your groups has a member called NAME: name members of your groups, or share with one of your groups."
    ]
    assert not SessionShare.objects.exists()
    share(client, running, users="alan")  # a member of the owner's lab
    assert SessionShare.objects.get().user == shared_user


def test_only_the_owners_own_groups_are_offered(
    client: Client, running: LLMSession, owner: Any, shared_user: Any, lab: Group
) -> None:
    elsewhere = Group.objects.create(name="physics")
    signed_in(client, owner)
    share(client, running, group=str(elsewhere.pk))
    assert not SessionShare.objects.exists()
    page = client.get(f"/sessions/{running.pk}/").content.decode()
    assert "nlp-lab" in page and "physics" not in page


def test_the_card_shows_who_it_is_shared_with_and_how_many_requests_each_made(
    client: Client, running: LLMSession, owner: Any, shared_user: Any
) -> None:
    signed_in(client, owner)
    share(client, running, users="alan")
    for user, n in ((owner, 1), (shared_user, 3)):
        for _ in range(n):
            ProxyRequest.objects.create(session=running, user=user, route="api", endpoint="chat/completions",
                                        status=200, completion_tokens=5, duration_ms=10)  # fmt: skip
    card = client.get(f"/sessions/{running.pk}/card").content.decode()
    assert "Shared with alan (chat and API)" in card and "alan 3, ada 1" in card


def test_someone_elses_session_is_reached_by_its_uuid_or_owner_slash_alias_never_by_a_bare_name(
    client: Client, running: LLMSession, owner: Any, shared_user: Any, other_user: Any, support_user: Any,
    account: ClusterAccount, django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    # The member's own session of the same model, not running yet; the owner's shared one under an alias spelt like
    # the catalog's name (set before aliases were checked against the catalog), and a second owner's of the same alias.
    ClusterAccount.objects.create(cluster=account.cluster, user=shared_user, username="alan")
    ClusterAccount.objects.create(cluster=account.cluster, user=other_user, username="grace")
    with django_capture_on_commit_callbacks(execute=False):
        own, second = launch(shared_user, LAUNCH), launch(other_user, LAUNCH)
    LLMSession.objects.filter(pk=running.pk).update(alias="tiny-llama")
    transition(second.pk, State.RUNNING, cause="test", host="127.0.0.1", port=8081, alias="tiny-llama")
    for session, who in ((running, owner), (second, other_user)):
        SessionShare.objects.create(session=session, user=shared_user, created_by=who)
    member = targets.Holder(shared_user.pk)
    for name in ("tiny-llama", "tiny-llama:F16"):
        assert targets.target(member, name) is None, name  # the member's own session is not running: nothing
    transition(own.pk, State.RUNNING, cause="test", host="127.0.0.1", port=8082)
    assert getattr(targets.target(member, "tiny-llama"), "pk", None) == str(own.pk)
    assert getattr(targets.target(member, "ada/tiny-llama"), "pk", None) == str(running.pk)
    assert getattr(targets.target(member, "grace/tiny-llama"), "pk", None) == str(second.pk)
    assert getattr(targets.target(member, str(second.pk)), "pk", None) == str(second.pk)
    assert targets.target(targets.Holder(owner.pk), "ada/tiny-llama") is not None  # the owner may spell it so too
    support = targets.Holder(support_user.pk)
    assert targets.target(support, "ada/tiny-llama") is None and targets.target(support, str(running.pk)) is not None


def test_the_models_list_names_a_shared_session_as_every_lookup_reaches_it(
    running: LLMSession, owner: Any, shared_user: Any
) -> None:
    SessionShare.objects.create(session=running, user=shared_user, created_by=owner, chat=False)
    member = targets.Holder(shared_user.pk)
    listed = proxy._running_models(shared_user.pk)
    assert [(m["id"], m["owned_by"], m["shared"]) for m in listed] == [("ada/lab-llama", "ada", True)]
    LLMSession.objects.filter(pk=running.pk).update(alias="")
    listed += proxy._running_models(shared_user.pk)
    assert listed[1]["id"] == str(running.pk)
    LLMSession.objects.filter(pk=running.pk).update(alias="lab-llama")
    for entry in listed:
        found = targets.target(member, entry["id"])
        assert found is not None and found.pk == entry["session"], entry["id"]


def test_use_by_those_it_is_shared_with_keeps_it_from_idle_cancel(running: LLMSession, shared_user: Any) -> None:
    SessionShare.objects.create(session=running, user=shared_user, created_by=running.owner, chat=False)
    assert LLMSession.objects.get(pk=running.pk).last_activity_at is None
    assert targets.target(targets.Holder(shared_user.pk), "ada/lab-llama") is not None
    assert LLMSession.objects.get(pk=running.pk).last_activity_at is not None


def test_a_deleted_session_leaves_every_page_and_its_shares_end(
    client: Client, running: LLMSession, owner: Any, shared_user: Any
) -> None:
    signed_in(client, owner)
    share(client, running, users="alan")
    transition(running.pk, State.CANCELLED, cause="test")
    client.post(f"/sessions/{running.pk}/delete")
    assert SessionShare.objects.get().revoked_at is not None
    assert targets.target(targets.Holder(shared_user.pk), str(running.pk), "chat") is None
    assert client.get(f"/sessions/{running.pk}/chat/").status_code == 404
