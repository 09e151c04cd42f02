"""The keeper's round (issue 28): rollover before walltime (a successor launched in time by the service's own history,
the old replica draining once the successor is ready and cancelled once its requests end), scaling up under load and
down after the idle time, never below min or above max."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs.models import LLMSession, ModelService, ReplicaLoad, State, transition
from jobs.services import actions, health, keep, scaling, timing
from tests.conftest import LAUNCH

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def make(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> Any:
    def made(**fields: Any) -> ModelService:
        with django_capture_on_commit_callbacks(execute=False):
            return actions.create(owner, "llama-lab", LAUNCH, **fields)

    return made


def run(pk: str, port: int, started_ago: timedelta = timedelta(0)) -> None:
    transition(pk, State.RUNNING, cause="test", host="127.0.0.1", port=port)
    LLMSession.objects.filter(pk=pk).update(started_at=timezone.now() - started_ago)


def busy(pk: str, requests: int) -> None:
    """Requests open on the replica, as a portal process publishes them."""
    ReplicaLoad.objects.update_or_create(worker="web-1", session_id=pk,
                                         defaults={"inflight": requests, "updated_at": timezone.now()})  # fmt: skip


def live(service: ModelService) -> list[LLMSession]:
    replicas = service.replicas.filter(cancel_requested_at__isnull=True)
    return list(replicas.exclude(state__in=[State.COMPLETED, State.FAILED]))


def test_the_time_to_ready_comes_from_the_services_own_history(make: Any, settings: Any) -> None:
    settings.PORTAL_SERVICE_READY_S = 300
    service = make(min_replicas=1, max_replicas=1)
    assert timing.ready_after(service) == timedelta(seconds=300)  # no history yet: the site's default
    (pk,) = keep.reconcile(service.pk).created
    created = timezone.now() - timedelta(seconds=40)
    LLMSession.objects.filter(pk=pk).update(created_at=created, ready_at=created + timedelta(seconds=30))
    assert timing.ready_after(service) == timedelta(seconds=30)
    assert timing.lead(service) == timedelta(seconds=30) + timing.MIN_MARGIN


def test_a_replica_near_its_walltime_gets_a_successor_then_drains_and_is_cancelled(make: Any, settings: Any) -> None:
    settings.PORTAL_SERVICE_READY_S = 60  # lead: 60 s + 60 s margin
    service = make(min_replicas=1, max_replicas=1)
    (old,) = keep.reconcile(service.pk).created
    walltime = LLMSession.objects.get(pk=old).walltime_min
    run(old, 9, started_ago=timedelta(minutes=walltime) - timedelta(minutes=5))  # 5 minutes left: not yet
    assert keep.reconcile(service.pk).created == []
    LLMSession.objects.filter(pk=old).update(started_at=timezone.now() - timedelta(minutes=walltime - 1))
    (successor,) = keep.reconcile(service.pk).created
    assert LLMSession.objects.get(pk=successor).replaces_id == LLMSession.objects.get(pk=old).pk
    assert keep.reconcile(service.pk).created == []  # once
    busy(old, 2)
    run(successor, 10)
    keep.reconcile(service.pk)
    assert LLMSession.objects.get(pk=old).draining_since is not None  # the successor is ready: the old one drains
    LLMSession.objects.filter(pk=old).update(draining_since=timezone.now() - timedelta(seconds=30))
    keep.reconcile(service.pk)
    assert LLMSession.objects.get(pk=old).cancel_requested_at is None  # two requests still open on it
    busy(old, 0)
    assert keep.reconcile(service.pk).cancel == [old]  # for the task to scancel
    assert LLMSession.objects.get(pk=old).cancel_requested_at is not None
    assert [r.pk for r in live(service)] == [LLMSession.objects.get(pk=successor).pk]
    assert keep.reconcile(service.pk).created == []  # the successor alone is the one kept


def test_a_service_scales_up_under_load_and_down_after_the_idle_time(make: Any) -> None:
    service = make(min_replicas=1, max_replicas=3, target_inflight=2, idle_minutes=1)
    (first,) = keep.reconcile(service.pk).created
    run(first, 9)
    busy(first, 5)  # 5 in flight on one replica, target 2
    assert keep.reconcile(service.pk).created == []  # a burst shorter than SCALE_UP_AFTER is absorbed
    ModelService.objects.filter(pk=service.pk).update(busy_since=timezone.now() - scaling.SCALE_UP_AFTER)
    added = keep.reconcile(service.pk).created
    assert len(added) == 2  # ceil(5 / 2) = 3, the max
    service.refresh_from_db()
    assert service.keeps == 3
    for port, pk in enumerate(added, start=10):
        run(pk, port)
    busy(first, 0)
    assert keep.reconcile(service.pk).created == []  # quiet now, but not for the idle time yet
    ModelService.objects.filter(pk=service.pk).update(quiet_since=timezone.now() - timedelta(minutes=1))
    keep.reconcile(service.pk)
    service.refresh_from_db()
    assert service.keeps == 2
    assert service.replicas.filter(draining_since__isnull=False).count() == 1  # one drains, then is cancelled
    ModelService.objects.filter(pk=service.pk).update(quiet_since=timezone.now() - timedelta(minutes=1))
    keep.reconcile(service.pk)
    service.refresh_from_db()
    assert service.keeps == 1  # never below min
    ModelService.objects.filter(pk=service.pk).update(quiet_since=timezone.now() - timedelta(minutes=5))
    keep.reconcile(service.pk)
    service.refresh_from_db()
    assert service.keeps == 1


def test_a_service_with_min_0_lets_its_last_replica_go_only_after_the_idle_time(make: Any) -> None:
    service = make(min_replicas=0, max_replicas=1, idle_minutes=2)
    assert actions.wake(service.pk) and not actions.wake(service.pk)  # one wake-up for many requests
    (pk,) = keep.reconcile(service.pk).created
    run(pk, 9)
    LLMSession.objects.filter(pk=pk).update(last_activity_at=timezone.now() - timedelta(minutes=1))
    keep.reconcile(service.pk)
    ModelService.objects.filter(pk=service.pk).update(quiet_since=timezone.now() - timedelta(minutes=3))
    keep.reconcile(service.pk)
    service.refresh_from_db()
    assert service.keeps == 1  # used a minute ago: not idle for 2 minutes yet
    LLMSession.objects.filter(pk=pk).update(last_activity_at=timezone.now() - timedelta(minutes=3))
    keep.reconcile(service.pk)
    ModelService.objects.filter(pk=service.pk).update(quiet_since=timezone.now() - timedelta(minutes=3))
    keep.reconcile(service.pk)
    service.refresh_from_db()
    assert service.keeps == 0 and LLMSession.objects.get(pk=pk).draining_since is not None


def test_a_replica_that_stops_answering_its_health_check_is_replaced(make: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(health, "CHECK_EVERY", timedelta(0))  # every round checks
    service = make(min_replicas=2, max_replicas=2)
    first, second = keep.reconcile(service.pk).created
    for port, pk in ((9, first), (10, second)):
        run(pk, port)
    LLMSession.objects.filter(service=service).update(ready_at=timezone.now() - timedelta(minutes=1))
    hung = {first}
    asked: list[str] = []

    def answers(replica: LLMSession) -> bool:
        asked.append(str(replica.pk))
        return str(replica.pk) not in hung

    assert health.check_all(answers) == [] and sorted(asked) == sorted([first, second])
    assert health.check_all(answers) == []  # two failures in a row: a moment of load, a restart
    hung.clear()
    assert health.check_all(answers) == []  # it answered again: the count starts over
    hung.add(first)
    for _ in range(health.UNHEALTHY_AFTER - 1):
        assert health.check_all(answers) == []
    assert health.check_all(answers) == [first]  # the third in a row: given up on, for the task to scancel
    replaced = LLMSession.objects.get(pk=first)
    assert replaced.cancel_requested_at is not None and replaced.draining_since is not None
    (replacement,) = keep.reconcile(service.pk).created  # and the keeper launches another
    assert replacement not in (first, second)


def test_a_replica_its_owners_allocation_refuses_is_not_launched_and_the_service_says_why(
    make: Any, owner: Any, client: Any
) -> None:
    from jobs.models import Allocation

    service = make(min_replicas=1, max_replicas=1)
    allocation = Allocation.objects.create(user=owner, gpu_hours=0, period="month")  # set afterwards
    assert keep.reconcile(service.pk).created == []
    service.refresh_from_db()
    assert "the allocation of user ada has 0 of 0 GPU-hours left this month" in service.launch_refused
    client.force_login(owner)
    assert (
        "The last replica could not be launched: This launch reserves"
        in client.get(f"/services/{service.name}/").content.decode()
    )
    allocation.delete()
    assert len(keep.reconcile(service.pk).created) == 1
    service.refresh_from_db()
    assert service.launch_refused == ""
