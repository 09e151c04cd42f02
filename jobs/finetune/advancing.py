"""A comparison that launched its own session, moved along (jobs/finetune/comparisons.py says what a comparison is):
after each poll of the session's account and from beat, jobs.tasks calls advance(), which starts the two batch runs
once the session runs, ends the comparison with the reason when the session ends first, and ends the session once
both batch runs have ended, each step claimed by a conditional UPDATE. It records what it does and returns what is to
be sent on (Step): the tasks enqueue that, as this module sits below them (tests/test_layout.py: no import cycle)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from jobs.batch import runs
from jobs.batch.forms import Checked
from jobs.finetune import compare
from jobs.models import BatchRun, FineTuneComparison, FineTuneRun, LLMSession, State
from jobs.sessions import lifecycle
from portal.errors import messages_of


def record_batches(
    session: LLMSession, run: FineTuneRun, base_requests: IO[bytes], columns: Mapping[str, Any]
) -> tuple[BatchRun, BatchRun]:
    """The base's batch run and the adapter's (the same requests, each body naming the adapter) on the session; both
    are recorded, not staged: the caller stages them once the write commits. Each leaves half of the room a run on a
    session leaves for chat, so the two together keep a slot free."""
    loaded = [str(pk) for pk in session.adapters.order_by("pk").values_list("pk", flat=True)]
    fields = compare.adapter_fields(session.runtime.kind, loaded, str(run.pk), session.served_model_name)
    concurrency = max(1, (session.parallel - 1) // 2)
    with tempfile.TemporaryFile() as adapter_requests:
        compare.adapter_requests(base_requests, adapter_requests, fields)
        base_requests.seek(0)
        adapter_requests.seek(0)
        name = columns["name"]

        def batch(requests: IO[bytes], who: str) -> Checked:
            named = f"{name} ({who})"[:200]
            return Checked(requests, {**columns, "name": named, "concurrency": concurrency})

        with transaction.atomic():
            base = runs.on_session(session, batch(base_requests, "base"))
            adapter = runs.on_session(session, batch(adapter_requests, run.model_name))
    return base, adapter


def to_advance(session_ids: list[str] | None = None) -> list[str]:
    """The comparisons with a session of their own still to wait for or to end (of these sessions, if given)."""
    pending = FineTuneComparison.objects.filter(launched_session__isnull=False, session_released_at__isnull=True)
    if session_ids is not None:
        pending = pending.filter(launched_session_id__in=session_ids)
    return [str(pk) for pk in pending.values_list("pk", flat=True)]


@dataclass(frozen=True)
class Step:
    """What advance() did, and what its caller (jobs.tasks) sends on once it has committed: the batch runs to stage
    and the session to cancel (this module sits below the tasks, so it enqueues nothing itself)."""

    outcome: str
    staged: tuple[str, ...] = ()
    cancel: str = ""


def advance(comparison_id: str) -> Step:
    """Move a comparison that launched its session along, each step claimed by a conditional UPDATE (the poll's
    caller and beat may both ask): what it did.

    1. Waiting, and its session ended first (refused by Slurm, cancelled, failed): the comparison fails with why.
    2. Waiting, and its session runs: claim the start, then the two batch runs from the kept requests.
    3. Ended (both batch runs, or failed) with its session not yet released: claim that, and cancel the session.
    """
    comparison = (
        FineTuneComparison.objects.select_related("run__variant__model", "launched_session__runtime")
        .filter(pk=comparison_id)
        .first()
    )
    if comparison is None or comparison.launched_session is None:
        return Step("nothing")
    session = comparison.launched_session
    waiting = FineTuneComparison.objects.filter(pk=comparison.pk, state=FineTuneComparison.State.WAITING)
    if comparison.state == FineTuneComparison.State.WAITING:
        if session.is_ended:
            why = f"its session {session.get_state_display().lower()}" + (
                f": {session.end_reason}" if session.end_reason else ""
            )
            if not _fail(comparison, why):
                return Step("not claimed")
        elif session.state == State.RUNNING and session.host:
            try:
                with transaction.atomic():
                    if not waiting.update(state=FineTuneComparison.State.STARTED):
                        return Step("not claimed")
                    with comparison.requests.open("rb") as requests:
                        base, adapter = record_batches(session, comparison.run, requests, comparison.asked)
                    FineTuneComparison.objects.filter(pk=comparison.pk).update(
                        base_batch=base, adapter_batch=adapter, prompts=base.prompts
                    )
            except ValidationError as exc:
                if not _fail(comparison, f"its batch runs could not start: {'; '.join(messages_of(exc))}"):
                    return Step("not claimed")
            else:
                _discard_requests(comparison)
                return Step("started", staged=(str(base.pk), str(adapter.pk)))
        else:
            return Step("waiting")
    comparison.refresh_from_db()
    if comparison.session_released_at is not None:
        return Step("done")
    if not comparison.is_ended:
        return Step("running")
    released = FineTuneComparison.objects.filter(pk=comparison.pk, session_released_at__isnull=True)
    if not released.update(session_released_at=timezone.now()):
        return Step("not claimed")
    if not session.is_ended:
        name = comparison.name[:120]
        ended = f"ended by its comparison ({name}) once both batch runs had ended"
        if lifecycle.mark_cancel(session.pk, f"comparison {name} ended", ended):
            return Step("released", cancel=str(session.pk))
    return Step("released")


def _fail(comparison: FineTuneComparison, reason: str) -> bool:
    """End a waiting comparison with its reason; False if it was no longer waiting."""
    waiting = FineTuneComparison.objects.filter(pk=comparison.pk, state=FineTuneComparison.State.WAITING)
    if not waiting.update(state=FineTuneComparison.State.FAILED, reason=reason[:500]):
        return False
    comparison.state = FineTuneComparison.State.FAILED
    _discard_requests(comparison)
    return True


def _discard_requests(comparison: FineTuneComparison) -> None:
    """The kept requests once the batch runs have their own copies (or will never need them)."""
    if comparison.requests:
        comparison.requests.delete(save=False)
        FineTuneComparison.objects.filter(pk=comparison.pk).update(requests="")
