"""The jobs app's admin pages: sharing shown on a session, group sources, the request records."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client

from catalog.models import ClusterAccount
from jobs.models import GroupSource, LLMSession, ProxyRequest, SessionShare
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
