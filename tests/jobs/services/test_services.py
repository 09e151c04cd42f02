"""Model services, first part (issue 28): created from a launch the launch form checks, kept at their minimum of
replicas (ordinary sessions marked with the service), used by name by those allowed, a request that a replica does not
answer taken to another; the command line.

The replicas' servers are the proxy tests' stand-in (tests/jobs/use/upstream.py); the rows are committed, since the
proxy looks things up on threads of its own."""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.contrib.auth.models import Group, Permission
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs.models import LLMSession, ModelService, ProxyRequest, State, transition
from jobs.services import actions, keep, replicas
from jobs.use import targets
from tests.asgi import Portal, bearer
from tests.conftest import LAUNCH
from tests.jobs.use.upstream import ANSWER, Server, answering, recorded, token_of

pytestmark = pytest.mark.django_db(transaction=True)
CHAT = {"model": "llama-lab", "messages": [{"role": "user", "content": "hi"}]}
NO_AFFINITY = {"model": "llama-lab", "input": "hi"}  # embeddings: no prompt cache to keep, so the least loaded replica


@pytest.fixture
def service(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> ModelService:
    with django_capture_on_commit_callbacks(execute=False):
        return actions.create(owner, "llama-lab", LAUNCH, min_replicas=2, max_replicas=3)


def ready(service: ModelService, ports: tuple[int, ...] = (9, 10)) -> list[LLMSession]:
    """The service's replicas, each running at 127.0.0.1 on one of `ports`."""
    made = keep.reconcile(service.pk).created
    assert len(made) == len(ports)
    for pk, port in zip(made, ports, strict=True):
        transition(pk, State.RUNNING, cause="test", host="127.0.0.1", port=port)
    return list(LLMSession.objects.filter(pk__in=made).order_by("port"))


def test_a_service_keeps_its_minimum_of_replicas_and_replaces_one_that_ended(service: ModelService, owner: Any) -> None:
    made = keep.reconcile(service.pk).created
    replicas_ = LLMSession.objects.filter(pk__in=made)
    assert len(made) == 2 and all(r.service_id == service.pk and r.owner_id == owner.pk for r in replicas_)
    assert all(r.state == State.PENDING and r.alias == "" for r in replicas_)
    assert keep.reconcile(service.pk).created == []  # nothing missing: nothing more
    transition(made[0], State.FAILED, cause="test: the job died")
    (replacement,) = keep.reconcile(service.pk).created
    assert replacement not in made
    actions.scale(service, 3, 3)
    assert len(keep.reconcile_all().created) == 1


def test_a_service_whose_replicas_keep_failing_pauses_its_launches(service: ModelService) -> None:
    """A broken launch (a model path gone, a node refusing the job) must not become a job a minute."""
    for _ in range(keep.FAILURES_TO_PAUSE):
        for pk in keep.reconcile(service.pk).created:
            transition(pk, State.FAILED, cause="test: the server did not start")
    assert LLMSession.objects.filter(service=service, state=State.FAILED).count() >= keep.FAILURES_TO_PAUSE
    assert keep.reconcile(service.pk).created == []
    LLMSession.objects.filter(service=service).update(ended_at=timezone.now() - keep.FAILURE_WINDOW)
    assert len(keep.reconcile(service.pk).created) == 2  # the window passed: it tries again


def test_a_stopped_service_cancels_its_replicas_and_launches_none(
    service: ModelService, django_capture_on_commit_callbacks: Any
) -> None:
    made = keep.reconcile(service.pk).created
    with django_capture_on_commit_callbacks(execute=False):
        assert actions.stop(service, "test") == 2
    assert all(s.cancel_requested_at is not None or s.is_ended for s in LLMSession.objects.filter(pk__in=made))
    assert keep.reconcile(service.pk).created == []


def test_a_service_is_checked_as_its_replicas_will_be_launched(
    account: ClusterAccount, owner: Any, other_user: Any, lab: Group
) -> None:
    with pytest.raises(ValidationError, match="context"):
        actions.create(owner, "too-long", {**LAUNCH, "context": 10_000_000})
    with pytest.raises(ValidationError, match="catalog name"):
        actions.create(owner, "tiny-llama", LAUNCH)
    with pytest.raises(ValidationError, match="page"):
        actions.create(owner, "new", LAUNCH)
    with pytest.raises(ValidationError, match="permission"):
        actions.create(owner, "for-all", LAUNCH, audience=ModelService.Audience.SITE)
    with pytest.raises(ValidationError, match="member"):
        actions.create(owner, "theirs", LAUNCH, audience=ModelService.Audience.GROUPS, groups=[lab])
    with pytest.raises(ValidationError, match="max"):
        actions.create(owner, "upside-down", LAUNCH, min_replicas=3, max_replicas=2)
    assert not ModelService.objects.exists()


@pytest.mark.parametrize("audience", ["owner", "groups", "site"])
def test_who_may_use_a_service_by_its_name(
    audience: str, account: ClusterAccount, owner: Any, other_user: Any, shared_user: Any, lab: Group,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    if audience == "site":
        owner.user_permissions.add(Permission.objects.get(codename="run_site_service"))
        owner = type(owner).objects.get(pk=owner.pk)  # the permission cache
    with django_capture_on_commit_callbacks(execute=False):
        service = actions.create(
            owner, "llama-lab", LAUNCH, audience=audience, groups=[lab] if audience == "groups" else ()
        )
    (replica,) = ready(service, (9,))
    reaches = {"owner": {owner}, "groups": {owner, shared_user}, "site": {owner, shared_user, other_user}}[audience]
    for user in (owner, shared_user, other_user):
        found = targets.target(targets.Holder(user.pk), "llama-lab")
        assert (found is not None) == (user in reaches), (audience, user)
        if found is not None:
            assert (found.pk, found.service) == (str(replica.pk), "llama-lab")


def test_a_request_goes_to_the_least_loaded_ready_replica(service: ModelService, owner: Any) -> None:
    first, second = ready(service)
    holder = targets.Holder(owner.pk)
    replicas.begin(str(first.pk))
    try:
        assert {targets.target(holder, "llama-lab").pk for _ in range(10)} == {str(second.pk)}  # type: ignore[union-attr]
    finally:
        replicas.end(str(first.pk))
    LLMSession.objects.filter(pk=second.pk).update(state=State.STARTING, host="")
    assert targets.target(holder, "llama-lab").pk == str(first.pk)  # type: ignore[union-attr]
    LLMSession.objects.filter(pk=first.pk).update(state=State.QUEUED, host="")
    with pytest.raises(targets.NotReady):  # none ready: the caller is told to come back (test_routing.py)
        targets.target(holder, "llama-lab")


def test_a_replica_that_cannot_be_reached_passes_the_request_to_another(
    service: ModelService, owner: Any, server: Server
) -> None:
    first, second = ready(service)

    def refuse_port_9(request: httpx.Request) -> httpx.Response:
        if request.url.port == 9:
            raise httpx.ConnectError("connection refused", request=request)
        return answering(200, json.dumps(ANSWER).encode(), "application/json")(request)

    server.answer = refuse_port_9
    api = Portal(bearer(token_of(owner)))
    replicas.begin(str(second.pk))  # busier: the first request goes to port 9
    try:
        replies = [api.post("/api/v1/embeddings", json=NO_AFFINITY) for _ in range(4)]
    finally:
        replicas.end(str(second.pk))
    assert [r.status_code for r in replies] == [200] * 4 and all(r.json() == ANSWER for r in replies)
    # Port 9 refused the first request, which went on to port 10; cooled down, port 9 was asked no more.
    assert [r.url.port for r in server.got] == [9, 10, 10, 10, 10]
    assert recorded(session=second, status=200) and not ProxyRequest.objects.filter(session=first).exists()
    # With no other replica, the caller gets the error the one replica gave.
    LLMSession.objects.filter(pk=second.pk).update(state=State.QUEUED, host="")
    replicas.cool_down(str(first.pk), 0)
    refused = api.post("/api/v1/embeddings", json=NO_AFFINITY)
    assert refused.status_code == 502 and refused.json()["error"]["type"] == "upstream_error"


def test_the_models_list_names_a_service_once_to_those_who_may_use_it(
    service: ModelService, owner: Any, other_user: Any, server: Server
) -> None:
    ready(service)
    mine = Portal(bearer(token_of(owner))).get("/api/v1/models").json()["data"]
    (listed,) = [m for m in mine if m["id"] == "llama-lab"]
    assert listed["service"] is True and listed["replicas"] == 2
    theirs = Portal(bearer(token_of(other_user))).get("/api/v1/models").json()["data"]
    assert "llama-lab" not in [m["id"] for m in theirs]
    assert Portal(bearer(token_of(other_user))).post("/api/v1/chat/completions", json=CHAT).status_code == 404


def test_the_command_line_creates_shows_scales_and_stops_a_service(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    flags = ["--cluster", "local", "--partition", "gpu", "--gpu", "a100-80g", "--gpus", "1", "--model", "tiny-llama",
             "--quant", "F16", "--runtime", "llama.cpp", "--context", "1024"]  # fmt: skip
    out = StringIO()
    with django_capture_on_commit_callbacks(execute=False):
        call_command("services", "create", "llama-lab", "--user", owner.username, *flags, "--min", "1", "--max", "2",
                     "--json", stdout=out)  # fmt: skip
    created = json.loads(out.getvalue())
    assert (created["name"], created["min"], created["max"], created["audience"]) == ("llama-lab", 1, 2, "owner")
    (made,) = keep.reconcile(ModelService.objects.get(name="llama-lab").pk).created
    transition(made, State.RUNNING, cause="test", host="127.0.0.1", port=9)
    out = StringIO()
    call_command("services", "show", "llama-lab", "--json", stdout=out)
    (replica,) = json.loads(out.getvalue())["replicas"]
    assert (replica["uuid"], replica["state"], replica["inflight"]) == (made, "running", 0)
    with django_capture_on_commit_callbacks(execute=False):
        call_command("services", "scale", "llama-lab", "--min", "2", "--max", "2", stdout=StringIO())
        call_command("services", "stop", "llama-lab", stdout=StringIO())
    service = ModelService.objects.get(name="llama-lab")
    assert (service.min_replicas, service.running) == (2, False)
    assert LLMSession.objects.get(pk=made).cancel_requested_at is not None


def test_a_services_fair_share_cap_is_set_from_the_command_line_and_kept_when_not_named(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    flags = ["--cluster", "local", "--partition", "gpu", "--gpu", "a100-80g", "--gpus", "1", "--model", "tiny-llama",
             "--quant", "F16", "--runtime", "llama.cpp", "--context", "1024"]  # fmt: skip
    with django_capture_on_commit_callbacks(execute=False):
        call_command("services", "create", "llama-lab", "--user", owner.username, *flags, "--max-inflight-per-user",
                     "3", stdout=StringIO())  # fmt: skip
        service = ModelService.objects.get(name="llama-lab")
        assert (service.max_inflight_per_user, service.inflight_cap) == (3, 3)
        call_command("services", "scale", "llama-lab", "--min", "1", "--max", "2", stdout=StringIO())
        service.refresh_from_db()
        assert service.max_inflight_per_user == 3  # not named: kept
        call_command("services", "scale", "llama-lab", "--min", "1", "--max", "2", "--max-inflight-per-user", "site",
                     stdout=StringIO())  # fmt: skip
        service.refresh_from_db()
        assert service.max_inflight_per_user is None and service.inflight_cap == settings.PORTAL_MAX_INFLIGHT_PER_USER
        with pytest.raises(CommandError, match="neither a number nor 'site'"):
            call_command("services", "scale", "llama-lab", "--min", "1", "--max", "2", "--max-inflight-per-user", "x")
