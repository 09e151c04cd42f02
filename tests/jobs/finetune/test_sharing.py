"""Sharing a fine-tune run's adapter (docs/finetune.md, sharing): the grants and whom they may name, what a grantee
gets (the run's page read-only, the list's "Shared with me", loading the adapter in a launch through the same cluster
user, or another one's with a copy) and what they do not (controls, another cluster, the owner's sessions), revoking
and expiry, and the command line."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from catalog.models import Cluster, ClusterAccount, ModelCard
from jobs.models import FineTuneRun, FineTuneShare, LLMSession, State, transition
from jobs.sessions import adapter_copies as copies
from jobs.sessions.actions import launch
from jobs.sessions.forms import LaunchForm, loadable_adapters
from jobs.use import targets
from tests.conftest import LAUNCH
from tests.jobs.finetune.test_runs import QUERIES

pytestmark = pytest.mark.django_db


@pytest.fixture
def adapter(start: Callable[..., FineTuneRun]) -> FineTuneRun:
    """A completed LoRA run of tiny-llama, the owner's, trained through their own account."""
    run = start(suffix="doors", lora_rank=4)
    FineTuneRun.objects.filter(pk=run.pk).update(state=FineTuneRun.State.COMPLETED, step=run.planned_steps)
    return FineTuneRun.objects.select_related("variant__model", "owner").get(pk=run.pk)


@pytest.fixture
def lab_account(account: ClusterAccount, owner: Any, shared_user: Any) -> ClusterAccount:
    """The lab's service account on the local cluster, which the owner and alan both submit through."""
    lab = ClusterAccount.objects.create(cluster=account.cluster, kind=ClusterAccount.Kind.SERVICE, username="nlp")
    lab.members.set([owner, shared_user])
    return lab


def signed_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def share(client: Client, run: FineTuneRun, **fields: Any) -> Any:
    return client.post(f"/finetune/{run.pk}/share", {k: v for k, v in fields.items() if v is not None})


def refusal(user: Any, **changes: Any) -> str:
    form = LaunchForm({**LAUNCH, **changes}, user=user)
    assert not form.is_valid()
    return " ".join(str(e) for e in form.errors.get("adapter", form.errors.get("__all__", [])))


def test_the_owner_shares_a_run_and_the_grantee_sees_it_read_only_and_listed(
    adapter: FineTuneRun, owner: Any, shared_user: Any
) -> None:
    page = signed_in(owner).get(f"/finetune/{adapter.pk}/").content.decode()
    assert "Sharing the adapter" in page and "Not shared" in page
    assert share(signed_in(owner), adapter, users="alan", days="3").status_code == 302
    grant = FineTuneShare.objects.get()
    assert (grant.run, grant.user, grant.created_by) == (adapter, shared_user, owner)
    assert grant.expires_at is not None and grant.expires_at > timezone.now() + timedelta(days=2)
    alan = signed_in(shared_user)
    listing = alan.get("/finetune/").content.decode()
    assert "Shared with me" in listing and adapter.model_name in listing and f"/finetune/{adapter.pk}/" in listing
    page = alan.get(f"/finetune/{adapter.pk}/").content.decode()
    assert adapter.model_name in page and "Download the adapter" in page
    assert "Sharing the adapter" not in page and "Cancel the run" not in page
    assert share(alan, adapter, users="ada").status_code == 404  # a grantee shares nothing on
    assert alan.post(f"/finetune/{adapter.pk}/share/{grant.pk}/revoke").status_code == 404
    assert alan.post(f"/finetune/{adapter.pk}/cancel").status_code == 404
    owners_page = signed_in(owner).get(f"/finetune/{adapter.pk}/").content.decode()
    assert "alan" in owners_page and "Stop sharing" in owners_page


def test_a_group_grant_reaches_its_members_and_nobody_else(
    adapter: FineTuneRun, owner: Any, shared_user: Any, lab: Group, other_user: Any, staff_user: Any
) -> None:
    assert share(signed_in(owner), adapter, group=str(lab.pk)).status_code == 302
    assert FineTuneShare.objects.get().group == lab
    assert signed_in(shared_user).get(f"/finetune/{adapter.pk}/").status_code == 200
    for stranger in (other_user, staff_user):
        client = signed_in(stranger)
        assert client.get(f"/finetune/{adapter.pk}/").status_code == 404
        assert client.get(f"/finetune/{adapter.pk}/adapter.tar.gz").status_code == 404
        assert adapter.model_name not in client.get("/finetune/").content.decode()


def test_support_staff_see_the_run_but_neither_share_it_nor_download_it(
    adapter: FineTuneRun, support_user: Any, shared_user: Any
) -> None:
    support = signed_in(support_user)
    reply = support.get(f"/finetune/{adapter.pk}/")
    page = reply.content.decode()
    assert reply.status_code == 200 and "Download the adapter" not in page and "Sharing the adapter" not in page
    assert share(support, adapter, users="alan").status_code == 404
    assert not FineTuneShare.objects.exists()


def test_revoking_or_expiry_ends_the_grantees_access(
    adapter: FineTuneRun, owner: Any, shared_user: Any, lab_account: ClusterAccount
) -> None:
    FineTuneRun.objects.filter(pk=adapter.pk).update(account=lab_account)
    share(signed_in(owner), adapter, users="alan")
    grant = FineTuneShare.objects.get()
    alan = signed_in(shared_user)
    assert alan.get(f"/finetune/{adapter.pk}/").status_code == 200
    FineTuneShare.objects.filter(pk=grant.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    assert alan.get(f"/finetune/{adapter.pk}/").status_code == 404
    assert "Shared with me" not in alan.get("/finetune/").content.decode()
    launch_with = {"adapter": adapter.model_name, "account": lab_account.pk}
    assert "You have no fine-tune run named" in refusal(shared_user, **launch_with)
    share(signed_in(owner), adapter, users="alan")
    assert alan.get(f"/finetune/{adapter.pk}/").status_code == 200
    fresh = FineTuneShare.objects.get(revoked_at__isnull=True, expires_at__isnull=True)
    assert signed_in(owner).post(f"/finetune/{adapter.pk}/share/{fresh.pk}/revoke").status_code == 302
    assert alan.get(f"/finetune/{adapter.pk}/").status_code == 404
    assert "You have no fine-tune run named" in refusal(shared_user, **launch_with)
    page = signed_in(owner).get(f"/finetune/{adapter.pk}/").content.decode()
    assert "Earlier grants" in page and "Not shared" in page


def test_a_new_grant_replaces_the_one_in_force_for_the_same_user(
    adapter: FineTuneRun, owner: Any, shared_user: Any
) -> None:
    owners = signed_in(owner)
    share(owners, adapter, users="alan", days="1")
    share(owners, adapter, users="alan")
    first, second = FineTuneShare.objects.order_by("pk")
    assert first.revoked_at is not None and second.revoked_at is None and second.expires_at is None


def test_bad_grants_are_refused_with_the_sessions_reasons_and_change_nothing(
    adapter: FineTuneRun, owner: Any, shared_user: Any, other_user: Any, start: Callable[..., FineTuneRun]
) -> None:
    owners = signed_in(owner)
    for fields, reason in [
        ({}, "Name users or choose a group to share with."),
        ({"users": "ada"}, "The run is yours already: name others."),
        ({"users": "grace"}, "None of your groups has a member called grace"),  # outside the owner's groups
        ({"users": "nobody"}, "None of your groups has a member called nobody"),  # alike: names are not probed
    ]:
        reply = owners.post(f"/finetune/{adapter.pk}/share", fields, follow=True)
        assert reason in reply.content.decode(), fields
    queued = start(suffix="later")
    reply = owners.post(f"/finetune/{queued.pk}/share", {"users": "alan"}, follow=True)
    assert "only a completed run has an adapter to share" in reply.content.decode()
    assert not FineTuneShare.objects.exists()


def test_a_grantee_loads_a_shared_adapter_through_the_same_cluster_user(
    adapter: FineTuneRun, owner: Any, shared_user: Any, lab_account: ClusterAccount
) -> None:
    FineTuneRun.objects.filter(pk=adapter.pk).update(account=lab_account)  # trained in the lab account's home
    name = adapter.model_name
    assert "You have no fine-tune run named" in refusal(shared_user, adapter=name, account=lab_account.pk)
    share(signed_in(owner), adapter, users="alan")
    card = ModelCard.objects.get(name="tiny-llama")
    assert [run.pk for run in loadable_adapters(shared_user, card)] == [adapter.pk]  # the wizard offers it
    session = launch(shared_user, {**LAUNCH, "adapter": name, "account": lab_account.pk})
    assert session.owner == shared_user and list(session.adapters.all()) == [adapter]


def test_a_grantee_under_another_cluster_user_launches_with_a_copy_of_the_adapter(
    adapter: FineTuneRun, owner: Any, shared_user: Any
) -> None:
    alans = ClusterAccount.objects.create(cluster=Cluster.objects.get(slug="local"), user=shared_user, username="alan")
    share(signed_in(owner), adapter, users="alan")
    session = launch(shared_user, {**LAUNCH, "adapter": adapter.model_name, "account": alans.pk})
    assert list(session.adapters.all()) == [adapter]
    assert [run.pk for run in copies.copied_adapters(session)] == [adapter.pk]  # the submit copies it into alan's home


def test_a_grantee_on_another_cluster_is_told_why_not_and_how_to_get_it(
    adapter: FineTuneRun, owner: Any, shared_user: Any
) -> None:
    ClusterAccount.objects.create(cluster=Cluster.objects.get(slug="local"), user=shared_user, username="alan")
    FineTuneRun.objects.filter(pk=adapter.pk).update(cluster=Cluster.objects.get(slug="v100"))  # trained over there
    share(signed_in(owner), adapter, users="alan")
    why = refusal(shared_user, adapter=adapter.model_name)
    assert f"{adapter.model_name}'s adapter is on V100 cluster: launch on that cluster" in why, why
    assert "download it from the run's page" in why


def running_with(user: Any, run: FineTuneRun, **changes: Any) -> LLMSession:
    session = launch(user, {**LAUNCH, **changes, "adapter": run.model_name})
    transition(session.pk, State.RUNNING, cause="test", host="127.0.0.1", port=8080)
    return LLMSession.objects.get(pk=session.pk)


def test_a_shared_adapters_name_reaches_only_sessions_the_caller_may_use(
    adapter: FineTuneRun, owner: Any, shared_user: Any, other_user: Any, lab_account: ClusterAccount
) -> None:
    FineTuneRun.objects.filter(pk=adapter.pk).update(account=lab_account)
    owners = running_with(owner, adapter, account=lab_account.pk)
    share(signed_in(owner), adapter, users="alan")
    alan, grace = targets.Holder(shared_user.pk), targets.Holder(other_user.pk)
    assert targets.target(alan, adapter.model_name) is None  # the adapter is shared; the owner's session is not
    mine = running_with(shared_user, adapter, account=lab_account.pk)
    found = targets.target(alan, adapter.model_name)
    assert found is not None and found.pk == str(mine.pk) and found.lora == ((0, 1.0),)
    found = targets.target(targets.Holder(owner.pk), adapter.model_name)
    assert found is not None and found.pk == str(owners.pk)  # the owner's own, never the grantee's
    assert targets.target(grace, adapter.model_name) is None


def test_the_command_line_shares_and_unshares_for_the_owner(
    adapter: FineTuneRun, owner: Any, shared_user: Any, lab: Group
) -> None:
    out = StringIO()
    call_command("finetune", "share", str(adapter.pk), "--user", "alan", "--days", "2", stdout=out)
    call_command("finetune", "share", str(adapter.pk), "--group", "nlp-lab", stdout=out)
    assert "shared with alan (" in out.getvalue() and "shared with group nlp-lab (until revoked)" in out.getvalue()
    grants = FineTuneShare.objects.filter(revoked_at__isnull=True)
    assert {(g.user, g.group, g.created_by) for g in grants} == {(shared_user, None, owner), (None, lab, owner)}
    out = StringIO()
    call_command("finetune", "unshare", str(adapter.pk), "--user", "alan", stdout=out)
    assert "alan" not in out.getvalue() and "group nlp-lab" in out.getvalue()
    call_command("finetune", "unshare", str(adapter.pk), "--all", stdout=out)
    assert out.getvalue().endswith("is not shared\n") and not grants.all().exists()


def test_the_runs_shared_with_me_are_listed_in_a_fixed_number_of_queries(
    start: Callable[..., FineTuneRun], owner: Any, shared_user: Any, lab: Group, django_assert_num_queries: Any
) -> None:
    runs = [start(suffix=f"s{i}") for i in range(3)]
    FineTuneRun.objects.update(state=FineTuneRun.State.COMPLETED)
    for run in runs:
        FineTuneShare.objects.create(run=run, group=lab, created_by=owner)
    alan = signed_in(shared_user)
    alan.get("/finetune/")  # the session and the user, read once
    with django_assert_num_queries(QUERIES):
        page = alan.get("/finetune/").content.decode()
    assert all(run.model_name in page for run in runs)
