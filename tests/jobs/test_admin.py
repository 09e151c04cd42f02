"""The jobs app's admin pages: sharing shown on a session, group sources, the request records; and every action only
for staff who may change what it acts on."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth.models import Group, Permission
from django.test import Client

from catalog.models import ClusterAccount
from jobs.models import GroupSource, LLMSession, ProxyRequest, ScrapeToken, SessionShare, State
from jobs.sessions import groups
from jobs.sessions.actions import launch
from tests.conftest import LAUNCH

pytestmark = pytest.mark.django_db


def test_admins_see_shares_sources_and_request_records(
    admin_client: Client, account: ClusterAccount, owner: Any, shared_user: Any, lab: Group,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    with django_capture_on_commit_callbacks(execute=False):
        session: LLMSession = launch(owner, LAUNCH)
    SessionShare.objects.create(session=session, group=lab, created_by=owner)
    GroupSource.objects.create(group=lab, account=account, name="nlp")
    ProxyRequest.objects.create(session=session, user=shared_user, route="api", endpoint="chat/completions",
                                status=200, duration_ms=5)  # fmt: skip
    assert "nlp-lab" in admin_client.get(f"/admin/jobs/llmsession/{session.pk}/change/").content.decode()
    assert "nlp" in admin_client.get("/admin/jobs/groupsource/").content.decode()
    records = admin_client.get("/admin/jobs/proxyrequest/", {"q": "alan"}).content.decode()
    assert "chat/completions" in records
    assert admin_client.get("/admin/jobs/proxyrequest/add/").status_code == 403


def test_a_group_source_is_read_only_with_a_service_or_trusted_account(
    admin_client: Client, account: ClusterAccount, lab: Group
) -> None:
    service = ClusterAccount.objects.create(cluster=account.cluster, kind="service", label="portal", username="svc")
    form = admin_client.get("/admin/jobs/groupsource/add/").context["adminform"].form
    assert list(form.fields["account"].queryset) == [service]  # ada's own account is not offered
    refused = admin_client.post("/admin/jobs/groupsource/add/", {"group": lab.pk, "account": account.pk,
                                                                  "kind": "unix_group", "name": "nlp"})  # fmt: skip
    assert refused.status_code == 200 and not GroupSource.objects.exists()
    ClusterAccount.objects.filter(pk=account.pk).update(trusted=True)
    admin_client.post("/admin/jobs/groupsource/add/", {"group": lab.pk, "account": account.pk, "kind": "unix_group",
                                                       "name": "nlp"})  # fmt: skip
    assert GroupSource.objects.get().account == account


def staff_who_may(user: Any, *codenames: str) -> Any:
    """The staff user holding just these permissions (a fresh object: Django caches permissions on the one it read)."""
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return type(user).objects.get(pk=user.pk)


def offered(client: Client, changelist: str) -> list[str]:
    """The actions a changelist offers (none at all: no select)."""
    form = client.get(changelist).context["action_form"]
    return [] if form is None else [name for name, _ in form.fields["action"].choices if name]


def test_staff_who_may_only_view_are_offered_no_action_and_a_posted_one_does_nothing(
    client: Client, staff_user: Any, account: ClusterAccount, owner: Any, lab: Group,
    django_capture_on_commit_callbacks: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    with django_capture_on_commit_callbacks(execute=False):
        session: LLMSession = launch(owner, LAUNCH)
    LLMSession.objects.filter(pk=session.pk).update(state=State.QUEUED, job_id="42")
    service = ClusterAccount.objects.create(cluster=account.cluster, kind="service", label="portal", username="svc")
    source = GroupSource.objects.create(group=lab, account=service, name="nlp")
    token, _ = ScrapeToken.issue("prometheus")
    cases = [("llmsession", "cancel_sessions", session.pk), ("groupsource", "sync_now", source.pk),
             ("scrapetoken", "revoke", token.pk)]  # fmt: skip
    client.force_login(staff_who_may(staff_user, *(f"view_{model}" for model, _, _ in cases)))
    read: list[Group] = []
    monkeypatch.setattr(groups, "sync", read.append)
    for model, action, pk in cases:
        changelist = f"/admin/jobs/{model}/"
        assert offered(client, changelist) == []
        with django_capture_on_commit_callbacks(execute=False):
            posted = client.post(changelist, {"action": action, "_selected_action": [pk], "index": 0})
        assert posted.status_code in (200, 302)
    assert LLMSession.objects.get(pk=session.pk).cancel_requested_at is None
    assert read == [] and ScrapeToken.objects.get(pk=token.pk).revoked_at is None


def test_staff_with_the_change_permission_are_offered_the_actions_and_they_act(
    client: Client, staff_user: Any, account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        session: LLMSession = launch(owner, LAUNCH)
    LLMSession.objects.filter(pk=session.pk).update(state=State.QUEUED, job_id="42")
    token, _ = ScrapeToken.issue("prometheus")
    client.force_login(staff_who_may(staff_user, "view_llmsession", "change_llmsession", "view_scrapetoken",
                                     "change_scrapetoken", "view_batchrun", "change_batchrun", "view_groupsource",
                                     "change_groupsource"))  # fmt: skip
    assert offered(client, "/admin/jobs/llmsession/") == ["cancel_sessions"]
    assert offered(client, "/admin/jobs/batchrun/") == ["stop_runs"]
    assert offered(client, "/admin/jobs/groupsource/") == ["sync_now"]
    assert offered(client, "/admin/jobs/scrapetoken/") == ["revoke"]
    with django_capture_on_commit_callbacks(execute=False):
        client.post("/admin/jobs/llmsession/", {"action": "cancel_sessions", "_selected_action": [session.pk]})
    client.post("/admin/jobs/scrapetoken/", {"action": "revoke", "_selected_action": [token.pk]})
    assert LLMSession.objects.get(pk=session.pk).cancel_requested_at is not None
    assert ScrapeToken.objects.get(pk=token.pk).revoked_at is not None


def test_every_admin_action_of_the_portals_apps_needs_a_permission_beyond_viewing() -> None:
    """Django's own delete_selected needs the delete permission; every action of the portal's says which it needs."""
    for model, model_admin in admin.site._registry.items():
        if model._meta.app_label not in ("catalog", "jobs"):
            continue
        for action in model_admin.actions or ():
            func = action if callable(action) else getattr(model_admin, action)
            permissions = getattr(func, "allowed_permissions", ())
            assert permissions and "view" not in permissions, f"{type(model_admin).__name__}.{func.__name__}"
