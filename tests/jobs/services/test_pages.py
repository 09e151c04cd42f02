"""Where people see and manage model services: the service's page (who sees it, its replicas with their load, the
owner's scale and stop), the list, creating one from the web with the launch form's fields, the wizard's link, My
sessions, the site dashboard, and the overview that `services show --json` prints."""

from __future__ import annotations

import html
import json
import re
from datetime import timedelta
from io import StringIO
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs.apps import USAGE_GROUP
from jobs.models import LLMSession, ModelService, ProxyRequest, ReplicaLoad, State, transition
from jobs.services import actions, keep, overview
from tests.conftest import LAUNCH

pytestmark = pytest.mark.django_db


def make(owner: Any, name: str = "llama-lab", capture: Any = None, **options: Any) -> ModelService:
    with capture(execute=False):
        return actions.create(owner, name, LAUNCH, **options)


def signed_in(client: Client, user: Any) -> Client:
    client.force_login(user)
    return client


@pytest.fixture
def service(account: ClusterAccount, owner: Any, lab: Group, django_capture_on_commit_callbacks: Any) -> ModelService:
    """A service of the owner's lab (its members may use it), of two to three replicas."""
    owner.groups.add(lab)
    return make(owner, capture=django_capture_on_commit_callbacks, min_replicas=2, max_replicas=3, audience="groups",
                groups=[lab])  # fmt: skip


def running(service: ModelService) -> list[LLMSession]:
    """Its replicas, launched, each running on a node of its own."""
    made = keep.reconcile(service.pk).created
    for n, pk in enumerate(made):
        transition(pk, State.RUNNING, cause="test", host="127.0.0.1", port=9 + n, job_id=str(100 + n),
                   node_list=f"gpu{n}", started_at=timezone.now() - timedelta(minutes=10))  # fmt: skip
    return list(LLMSession.objects.filter(pk__in=made).order_by("created_at"))


def site_permission(user: Any) -> Any:
    user.user_permissions.add(Permission.objects.get(codename="run_site_service"))
    return type(user).objects.get(pk=user.pk)  # the permission cache


@pytest.mark.parametrize(
    "who, status",
    [("owner", 200), ("shared_user", 200), ("support_user", 200), ("other_user", 404), ("staff_user", 404)],
)
def test_a_services_page_is_for_those_who_may_use_it_and_support_staff(
    client: Client, service: ModelService, who: str, status: int, request: pytest.FixtureRequest
) -> None:
    signed_in(client, request.getfixturevalue(who))
    page = client.get("/services/llama-lab/")
    assert page.status_code == status
    if status == 200:
        text = page.content.decode()
        assert '<code>model: "llama-lab"</code>' in text and "members of its groups: nlp-lab" in text
        assert "tiny-llama F16" in text and "local / gpu, 1 \u00d7 a100-80g" in text
    assert client.get("/services/no-such/").status_code == 404


def test_a_site_service_is_seen_by_everyone_signed_in(
    client: Client, account: ClusterAccount, owner: Any, other_user: Any, django_capture_on_commit_callbacks: Any
) -> None:
    make(site_permission(owner), "for-all", django_capture_on_commit_callbacks, audience="site")
    assert signed_in(client, other_user).get("/services/for-all/").status_code == 200
    assert "for-all" in client.get("/services/").content.decode()
    client.logout()
    assert client.get("/services/for-all/").status_code == 302  # to the sign-in page


@pytest.mark.parametrize("audience", ["owner", "groups", "site"])
def test_the_listing_query_agrees_with_may_use(
    audience: str, account: ClusterAccount, owner: Any, other_user: Any, shared_user: Any, lab: Group,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    creator = site_permission(owner) if audience == "site" else owner
    service = make(creator, capture=django_capture_on_commit_callbacks, audience=audience,
                   groups=[lab] if audience == "groups" else ())  # fmt: skip
    for user in (owner, shared_user, other_user):
        usable = ModelService.objects.usable_by(user).filter(pk=service.pk).exists()
        assert usable == service.may_use(user), (audience, user)


def test_the_replicas_table_shows_load_rate_time_left_and_rollover(
    client: Client, service: ModelService, shared_user: Any, support_user: Any, owner: Any
) -> None:
    first, second = running(service)
    now = timezone.now()
    ReplicaLoad.objects.create(worker="a", session=first, inflight=2, updated_at=now)
    ReplicaLoad.objects.create(worker="b", session=first, inflight=1, updated_at=now)
    ReplicaLoad.objects.create(worker="c", session=second, inflight=5, updated_at=now - timedelta(minutes=1))  # stale
    for at in (now, now - timedelta(seconds=30), now - timedelta(minutes=5)):
        ProxyRequest.objects.create(session=first, user=owner, route="api", endpoint="chat/completions", status=200,
                                    duration_ms=5, at=at)  # fmt: skip
    LLMSession.objects.filter(pk=first.pk).update(draining_since=now)
    LLMSession.objects.filter(pk=second.pk).update(replaces=first)
    seen = overview.overview(service)
    (a, b) = seen.replicas
    assert (a.inflight, a.requests_per_min, a.draining, a.ready) == (3, 2, True, False)
    assert (b.inflight, b.replaces, b.ready) == (0, str(first.pk), True)
    assert a.time_left_s is not None and 19 * 60 <= a.time_left_s <= 20 * 60  # 30 min walltime, started 10 min ago
    assert seen.ready == 1
    text = signed_in(client, shared_user).get("/services/llama-lab/").content.decode()
    assert "<strong>1</strong> ready of 2 kept" in text and "gpu0" in text and 'hx-trigger="every 3s"' in text
    assert "draining" in text and f"takes over from <code>{str(first.pk)[:8]}</code>" in text
    assert f'href="/sessions/{first.pk}/"' not in text  # a member of the lab does not see the owner's sessions
    for who in (owner, support_user):
        assert f'href="/sessions/{first.pk}/"' in signed_in(client, who).get("/services/llama-lab/").content.decode()
    partial = client.get("/services/llama-lab/", headers={"HX-Request": "true"}).content.decode()
    assert "<html" not in partial and 'id="replicas"' in partial and "gpu1" in partial


def test_the_owner_scales_the_service_and_a_bad_scale_is_shown_on_the_form(
    client: Client, service: ModelService, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    signed_in(client, owner)
    assert 'action="/services/llama-lab/scale"' in client.get("/services/llama-lab/").content.decode()
    with django_capture_on_commit_callbacks(execute=False) as enqueued:
        reply = client.post("/services/llama-lab/scale", {"min_replicas": 1, "max_replicas": 4,
                                                          "target_inflight": 8, "idle_minutes": 5})  # fmt: skip
    assert reply.status_code == 302 and reply["Location"] == "/services/llama-lab/" and len(enqueued) == 1
    service.refresh_from_db()
    assert (service.min_replicas, service.max_replicas, service.target_inflight, service.idle_minutes) == (1, 4, 8, 5)
    refused = client.post("/services/llama-lab/scale", {"min_replicas": 5, "max_replicas": 2, "target_inflight": 8,
                                                        "idle_minutes": 5})  # fmt: skip
    assert refused.status_code == 200 and "At most max replicas." in refused.content.decode()
    service.refresh_from_db()
    assert (service.min_replicas, service.max_replicas) == (1, 4)


@pytest.mark.parametrize("who", ["shared_user", "other_user", "support_user"])
def test_only_the_owner_scales_or_stops_a_service(
    client: Client, service: ModelService, who: str, request: pytest.FixtureRequest
) -> None:
    """Those who use it, and support staff, see it but change nothing (as a session's sharing is its owner's)."""
    signed_in(client, request.getfixturevalue(who))
    assert 'action="/services/llama-lab/scale"' not in client.get("/services/llama-lab/").content.decode()
    scale = {"min_replicas": 0, "max_replicas": 1, "target_inflight": 1, "idle_minutes": 1}
    assert client.post("/services/llama-lab/scale", scale).status_code == 404
    assert client.post("/services/llama-lab/stop").status_code == 404
    service.refresh_from_db()
    assert (service.min_replicas, service.running) == (2, True)


def test_the_owner_stops_the_service_and_its_replicas_are_cancelled(
    client: Client, service: ModelService, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    replicas = running(service)
    signed_in(client, owner)
    assert 'hx-confirm="Stop llama-lab?' in client.get("/services/llama-lab/").content.decode()
    assert client.get("/services/llama-lab/stop").status_code == 405  # a change is a POST
    with django_capture_on_commit_callbacks(execute=False):
        reply = client.post("/services/llama-lab/stop", headers={"HX-Request": "true"})
    assert reply.status_code == 200 and reply["HX-Redirect"] == "/services/llama-lab/"
    service.refresh_from_db()
    assert not service.running
    assert all(r.cancel_requested_at for r in LLMSession.objects.filter(pk__in=[r.pk for r in replicas]))
    text = client.get("/services/llama-lab/").content.decode()
    assert "Stopped" in text and 'action="/services/llama-lab/stop"' not in text


def test_the_wizard_offers_to_keep_an_option_running_as_a_service(
    client: Client, account: ClusterAccount, owner: Any
) -> None:
    page = signed_in(client, owner).get("/launch/", {"model": "tiny-llama", "context": "1024"}).content.decode()
    links = re.findall(r'href="(/services/new/\?[^"]+)">Keep it running as a service', page)
    assert links
    query = dict(parse_qsl(urlsplit(html.unescape(links[0])).query))
    assert (query["model"], query["cluster"], query["context"]) == ("tiny-llama", "local", "1024")
    form = client.get(html.unescape(links[0])).content.decode()
    assert 'name="name"' in form and 'name="min_replicas"' in form and 'value="tiny-llama"' in form
    assert 'name="alias"' not in form  # a session's own: callers name the service
    assert 'value="site"' not in form  # no permission for a site service


def test_a_service_created_from_the_web_is_launched_from_the_launch_form(
    client: Client, account: ClusterAccount, owner: Any, lab: Group, django_capture_on_commit_callbacks: Any
) -> None:
    owner.groups.add(lab)
    Group.objects.create(name="not-mine")
    signed_in(client, owner)
    page = client.get("/services/new/").content.decode()
    assert "nlp-lab" in page and "not-mine" not in page  # only the user's own groups
    posted = {**LAUNCH, "name": "lab-llama", "min_replicas": 1, "max_replicas": 2, "target_inflight": 4,
              "idle_minutes": 15, "audience": "groups", "groups": [lab.pk], "notify": "False"}  # fmt: skip
    with django_capture_on_commit_callbacks(execute=False) as enqueued:
        reply = client.post("/services/new/", posted)
    assert reply.status_code == 302 and reply["Location"] == "/services/lab-llama/" and len(enqueued) == 1
    service = ModelService.objects.get(name="lab-llama")
    assert (service.owner, service.audience, list(service.groups.all())) == (owner, "groups", [lab])
    assert service.launch["model"] == "tiny-llama" and service.launch["context"] == "1024"
    (replica,) = keep.reconcile(service.pk).created
    assert LLMSession.objects.get(pk=replica).context_length == 1024


def test_a_bad_launch_or_audience_creates_nothing_and_says_why(
    client: Client, account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    signed_in(client, owner)
    posted = {**LAUNCH, "name": "lab-llama", "min_replicas": 1, "max_replicas": 1, "target_inflight": 4,
              "idle_minutes": 15, "audience": "owner"}  # fmt: skip
    too_long = client.post("/services/new/", {**posted, "walltime": 2000})
    assert too_long.status_code == 200 and "gpu allows at most 1440 minutes" in too_long.content.decode()
    catalog_name = client.post("/services/new/", {**posted, "name": "tiny-llama"}).content.decode()
    assert "a model&#x27;s catalog name" in catalog_name
    groups_without_one = client.post("/services/new/", {**posted, "audience": "groups"}).content.decode()
    assert "Name the groups whose members may use it." in groups_without_one
    site = client.post("/services/new/", {**posted, "audience": "site"}).content.decode()
    assert "Select a valid choice" in site
    assert not ModelService.objects.exists()
    signed_in(client, site_permission(owner))
    assert 'value="site"' in client.get("/services/new/").content.decode()
    with django_capture_on_commit_callbacks(execute=False):
        assert client.post("/services/new/", {**posted, "audience": "site"}).status_code == 302
    assert ModelService.objects.get().audience == "site"


def test_the_list_shows_the_services_a_user_may_use(
    client: Client, service: ModelService, owner: Any, shared_user: Any, other_user: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    running(service)
    make(owner, "mine-only", django_capture_on_commit_callbacks)
    text = signed_in(client, shared_user).get("/services/").content.decode()
    assert 'href="/services/llama-lab/"' in text and "mine-only" not in text
    assert "2 / 2 / 3" in text and 'href="/services/new/"' in text
    assert "No services yet" in signed_in(client, other_user).get("/services/").content.decode()
    assert 'href="/services/"' in text  # the nav


def test_my_sessions_lists_usable_services_and_marks_replicas(
    client: Client, service: ModelService, owner: Any, shared_user: Any, django_assert_num_queries: Any
) -> None:
    first, _ = running(service)
    signed_in(client, owner)
    with django_assert_num_queries(10):  # as without services: the services with their ready replicas are one query
        text = client.get("/sessions/").content.decode()
    assert "Services you can use" in text and 'href="/services/llama-lab/"' in text and "2 of 2" in text
    card = text[text.index(f'id="s-{first.pk}"') :]
    assert "Replica of <a" in card[: card.index("</li>")]
    member = signed_in(client, shared_user).get("/sessions/").content.decode()
    assert "Services you can use" in member and "llama-lab" in member
    cards = client.get("/sessions/", headers={"HX-Request": "true"}).content.decode()
    assert "Services you can use" not in cards  # the polled part: the cards alone


def test_the_dashboard_shows_services_with_their_load(
    client: Client, service: ModelService, owner: Any, django_assert_num_queries: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    first, _ = running(service)
    ReplicaLoad.objects.create(worker="a", session=first, inflight=3, updated_at=timezone.now())
    ProxyRequest.objects.create(session=first, user=owner, route="api", endpoint="chat/completions", status=200,
                                duration_ms=5)  # fmt: skip
    viewer = type(owner).objects.create_user("turing", "turing@example.edu", "x")
    viewer.groups.add(Group.objects.get(name=USAGE_GROUP))
    signed_in(client, viewer)
    text = client.get("/dashboard/").content.decode()
    assert "<td>llama-lab</td><td>ada</td><td>members of its groups</td><td>2 / 2 / 3</td><td>3</td><td>1</td>" in text
    make(owner, "second", django_capture_on_commit_callbacks)
    with django_assert_num_queries(12):  # the dashboard's 8, the services, their replicas, load and requests
        client.get("/dashboard/")


def test_the_overview_is_what_services_show_json_prints(service: ModelService) -> None:
    first, _ = running(service)
    out = StringIO()
    call_command("services", "show", "llama-lab", "--json", stdout=out)
    shown = json.loads(out.getvalue())
    assert shown == json.loads(json.dumps(overview.describe(service)))
    assert {"name", "owner", "audience", "groups", "min", "max", "running", "launch", "replicas", "target_inflight",
            "idle_minutes", "desired", "keeps", "ready"} <= set(shown)  # fmt: skip
    assert (shown["target_inflight"], shown["idle_minutes"], shown["keeps"], shown["ready"]) == (4, 15.0, 2, 2)
    replica = shown["replicas"][0]
    assert {"uuid", "state", "job_id", "node_list", "inflight", "time_left_s", "requests_per_min", "draining",
            "replaces"} <= set(replica)  # fmt: skip
    assert (replica["uuid"], replica["state"], replica["job_id"], replica["node_list"], replica["inflight"]) == (
        str(first.pk), "running", "100", "gpu0", 0)  # fmt: skip
