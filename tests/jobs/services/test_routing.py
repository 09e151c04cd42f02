"""Routing a request that names a service (issue 28): affinity by the prompt's head with bounded loads, a replica that
answers 5xx before answering passing the request on, draining replicas taking no new requests, a service with no
ready replica woken and answered 503 with Retry-After, the load every portal process publishes, and /metrics.

The replicas' servers are the proxy tests' stand-in (tests/jobs/use/upstream.py)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import timedelta
from typing import Any

import httpx
import pytest
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs.models import LLMSession, ModelService, ReplicaLoad, State
from jobs.operations import metrics
from jobs.services import actions, affinity, keep, load, replicas
from jobs.usage import figures
from jobs.usage.figures import Period, Scope
from jobs.use import targets
from tests.asgi import Portal, bearer
from tests.conftest import LAUNCH
from tests.jobs.operations.conftest import parse
from tests.jobs.services.test_services import ready
from tests.jobs.use.upstream import ANSWER, Server, answering, recorded, token_of

pytestmark = pytest.mark.django_db(transaction=True)


def chat(system: str, first: str, *later: str) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": first}]
    messages += [{"role": "user", "content": text} for text in later]
    return {"model": "llama-lab", "messages": messages}


def counted(name: str, **labels: str) -> float:
    samples = parse(metrics.exposition()[0].decode())
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def service(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> ModelService:
    with django_capture_on_commit_callbacks(execute=False):
        return actions.create(owner, "llama-lab", LAUNCH, min_replicas=2, max_replicas=3)


def test_the_affinity_key_is_the_head_of_the_prompt() -> None:
    first_turn = affinity.key_of("chat/completions", chat("You are terse.", "hi"))
    later_turn = affinity.key_of("chat/completions", chat("You are terse.", "hi", "and then?"))
    assert first_turn and first_turn == later_turn  # a conversation's turns share their head
    assert affinity.key_of("chat/completions", chat("You are verbose.", "hi")) != first_turn
    # A short system prompt: the first question is part of the key, so a chat's conversations spread.
    assert affinity.key_of("chat/completions", chat("You are terse.", "hello")) != first_turn
    # A long one (past PREFIX_CHARS) is the key whatever is asked: a script's requests share the replica caching it.
    long = "Follow these rules. " * 200
    key = affinity.key_of("chat/completions", chat(long, "hi"))
    assert key == affinity.key_of("chat/completions", chat(long, "what else?"))
    anthropic = {"system": "You are terse.", "messages": [{"role": "user", "content": "hi"}]}
    assert affinity.key_of("messages", anthropic) != affinity.key_of("messages", {**anthropic, "system": "Other."})
    assert affinity.key_of("completions", {"prompt": "x" * 3000 + "a"}) == affinity.key_of(
        "completions", {"prompt": "x" * 3000 + "b"}
    )  # the same long preamble
    explicit = {**chat("a", "b"), "prompt_cache_key": "team-7"}
    assert affinity.key_of("chat/completions", explicit) == affinity.key_of("responses", {"prompt_cache_key": "team-7"})
    garbage: list[Any] = [None, [], {"messages": "no"}, {"messages": []}, {"input": 5}, {"prompt": {"a": 1}},
                          {"messages": [{"no": "role"}]}, {"prompt": [1, 2, 3]}]  # fmt: skip
    for payload in garbage:
        for route in ("chat/completions", "messages", "responses", "completions", "embeddings"):
            assert affinity.key_of(route, payload) == ""


def test_the_same_key_goes_to_the_same_replica_until_it_is_over_the_bound() -> None:
    pool = ["a", "b", "c"]
    keys = [f"key-{i}" for i in range(300)]
    chosen = {key: replicas.choose(pool, key) for key in keys}
    assert all(decision == replicas.AFFINITY for _, decision in chosen.values())
    assert all(replicas.choose(pool, key) == chosen[key] for key in keys)  # stable
    spread = Counter(pk for pk, _ in chosen.values())
    assert set(spread) == set(pool) and min(spread.values()) > 50  # each replica holds a share of the keys
    # A replica leaving moves only its own keys.
    without_c = {key: replicas.choose(["a", "b"], key)[0] for key in keys}
    assert all(without_c[key] == pk for key, (pk, _) in chosen.items() if pk != "c")
    # Over the bound (1.25 x the average load), a key's request spills to another replica.
    key = keys[0]
    home = chosen[key][0]
    assert home is not None
    for _ in range(4):
        replicas.begin(home)
    try:
        other, decision = replicas.choose(pool, key)
        assert other != home and decision == replicas.SPILLED
    finally:
        for _ in range(4):
            replicas.end(home)
    assert replicas.choose(pool, "")[1] == replicas.LEAST_LOADED


def test_a_conversation_stays_on_one_replica_and_metrics_say_so(
    service: ModelService, owner: Any, server: Server
) -> None:
    ready(service)
    api = Portal(bearer(token_of(owner)))
    before = counted("portal_service_routes_total", service="llama-lab", decision="affinity")
    for turn in range(4):
        reply = api.post("/api/v1/chat/completions", json=chat("You answer in French.", "bonjour", *["encore"] * turn))
        assert reply.status_code == 200
    assert len({r.url.port for r in server.got}) == 1
    ports = {api.post("/api/v1/chat/completions", json=chat(f"System {i}.", "hi")).status_code for i in range(12)}
    assert ports == {200} and len({r.url.port for r in server.got}) == 2  # other prefixes use the other replica too
    assert counted("portal_service_routes_total", service="llama-lab", decision="affinity") - before == 16


def test_a_replica_answering_5xx_before_its_answer_passes_the_request_on(
    service: ModelService, owner: Any, server: Server
) -> None:
    first, second = ready(service)

    def loading_on_9(request: httpx.Request) -> httpx.Response:
        if request.url.port == 9:  # llama-server answers 503 while it loads its model
            return answering(503, b'{"error":{"message":"Loading model","code":503}}', "application/json")(request)
        return answering(200, json.dumps(ANSWER).encode(), "application/json")(request)

    server.answer = loading_on_9
    before = counted("portal_service_failovers_total", service="llama-lab", reason="5xx", outcome="retried")
    api = Portal(bearer(token_of(owner)))
    replicas.begin(str(second.pk))  # busier: the first request goes to port 9
    try:
        reply = api.post("/api/v1/embeddings", json={"model": "llama-lab", "input": "x"})
    finally:
        replicas.end(str(second.pk))
    assert reply.status_code == 200 and reply.json() == ANSWER
    assert [r.url.port for r in server.got] == [9, 10]
    assert counted("portal_service_failovers_total", service="llama-lab", reason="5xx", outcome="retried") == before + 1
    # With no other replica ready, the caller gets the replica's own error.
    LLMSession.objects.filter(pk=second.pk).update(state=State.QUEUED, host="")
    replicas.cool_down(str(first.pk), 0)
    refused = api.post("/api/v1/embeddings", json={"model": "llama-lab", "input": "x"})
    assert refused.status_code == 503 and "Loading model" in refused.json()["error"]["message"]


def test_a_draining_replica_takes_no_new_request_while_another_is_ready(service: ModelService, owner: Any) -> None:
    first, second = ready(service)
    LLMSession.objects.filter(pk=first.pk).update(draining_since=timezone.now())
    holder = targets.Holder(owner.pk)
    assert {targets.target(holder, "llama-lab").pk for _ in range(10)} == {str(second.pk)}  # type: ignore[union-attr]
    LLMSession.objects.filter(pk=second.pk).update(state=State.QUEUED, host="")
    # The only one serving: better a draining replica than no answer.
    assert targets.target(holder, "llama-lab").pk == str(first.pk)  # type: ignore[union-attr]


def starting(owner: Any, settings: Any, hold_s: int, ready_s: int, min_replicas: int) -> ModelService:
    """A service with no ready replica, the site holding requests up to hold_s, expecting replicas ready in ready_s."""
    settings.PORTAL_SERVICE_HOLD_S, settings.PORTAL_SERVICE_READY_S = hold_s, ready_s
    return actions.create(owner, "llama-lab", LAUNCH, min_replicas=min_replicas, max_replicas=2)


def test_a_service_with_no_ready_replica_is_woken_and_answers_503_with_retry_after(
    account: ClusterAccount, owner: Any, other_user: Any, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        service = starting(owner, settings, hold_s=0, ready_s=90, min_replicas=0)
    assert keep.reconcile(service.pk).created == []  # min 0: nothing kept until asked
    api = Portal(bearer(token_of(owner)))
    reply = api.post("/api/v1/chat/completions", json=chat("s", "hi"))
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "service_starting"
    assert 1 <= int(reply.headers["retry-after"]) <= 90
    service.refresh_from_db()
    assert service.keeps == 1
    (made,) = keep.reconcile(service.pk).created
    assert LLMSession.objects.get(pk=made).service_id == service.pk
    # Anthropic's route answers in its shape; a stranger still gets the 404 of a name that does not exist.
    anthropic = api.post("/api/v1/messages", json={"model": "llama-lab", "max_tokens": 5, "messages": []})
    assert anthropic.status_code == 503 and anthropic.json()["type"] == "error" and "retry-after" in anthropic.headers
    stranger = Portal(bearer(token_of(other_user)))
    assert stranger.post("/api/v1/chat/completions", json=chat("s", "hi")).status_code == 404


def test_a_request_is_held_when_a_replica_is_about_to_be_ready(
    account: ClusterAccount, owner: Any, server: Server, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        service = starting(owner, settings, hold_s=5, ready_s=2, min_replicas=1)
    (made,) = keep.reconcile(service.pk).created
    api = Portal(bearer(token_of(owner)))

    def becomes_ready() -> None:  # while the request waits
        LLMSession.objects.filter(pk=made).update(state=State.RUNNING, host="127.0.0.1", port=9)

    threading.Timer(1.5, becomes_ready).start()
    reply = api.post("/api/v1/chat/completions", json=chat("s", "hi"))
    assert reply.status_code == 200 and [r.url.port for r in server.got] == [9]


def test_each_process_publishes_its_open_requests_reads_the_others_and_metrics_sum_them(service: ModelService) -> None:
    first, second = ready(service)
    other_process = "elsewhere:1:abc"
    ReplicaLoad.objects.create(worker=other_process, session=first, inflight=3, updated_at=timezone.now())
    ReplicaLoad.objects.create(worker="gone:2:def", session=second, inflight=9,
                               updated_at=timezone.now() - load.STALE * 2)  # fmt: skip
    load.publish({str(second.pk): 2})
    assert load.others(str(first.pk)) == 3 and load.others(str(second.pk)) == 0  # the stale row counts no more
    assert load.site_inflight([str(first.pk), str(second.pk)]) == {str(first.pk): 3, str(second.pk): 2}
    # /metrics says the same, for the operators.
    assert counted("portal_service_inflight", service="llama-lab") == 5
    assert counted("portal_service_replicas", service="llama-lab", state="running") == 2
    # Routing counts the others' requests: the second replica is the less loaded now.
    assert replicas.choose([str(first.pk), str(second.pk)])[0] == str(second.pk)
    load.publish({})  # nothing open here any more: this process's rows go
    assert not ReplicaLoad.objects.filter(worker=load.WORKER).exists()
    load.publish({})


def test_a_grantees_requests_are_theirs_and_the_gpu_hours_the_services(
    account: ClusterAccount, owner: Any, shared_user: Any, lab: Any, server: Server,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    with django_capture_on_commit_callbacks(execute=False):
        service = actions.create(owner, "llama-lab", LAUNCH, audience="groups", groups=[lab])
    (replica,) = ready(service, (9,))
    LLMSession.objects.filter(pk=replica.pk).update(started_at=timezone.now() - timedelta(hours=2))
    reply = Portal(bearer(token_of(shared_user))).post("/api/v1/chat/completions", json=chat("s", "hi"))
    assert reply.status_code == 200
    row = recorded(session=replica, status=200)
    assert row.user_id == shared_user.pk  # the grantee's request, in their usage
    period = Period.all_time()
    by_service = {r.key: r.tally for r in figures.table(Scope(period), "service")}
    assert by_service["llama-lab"].requests == 1 and by_service["llama-lab"].gpu_hours >= 1.9
    theirs = {r.key: r.tally for r in figures.table(Scope(period, user_id=shared_user.pk), "service")}
    assert theirs["llama-lab"].requests == 1 and theirs["llama-lab"].gpu_hours == 0  # the replica is not theirs
    owners = {r.key: r.tally for r in figures.table(Scope(period, user_id=owner.pk), "service")}
    assert owners["llama-lab"].gpu_hours >= 1.9 and owners["llama-lab"].requests == 0
