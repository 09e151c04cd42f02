"""A batch run's progress as the poll read it from the runner's progress.json (jobs/cluster/scripts/batchrun.py).

The sessions' poll (jobs.sessions.lifecycle.poll) reads the runners' files with its one SSH command but records
nothing of the runs: the batch engine sits above the sessions, and after_poll records them from what the poll read."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from jobs.models import END_STATES, BatchRun, State, transition_run
from jobs.sessions import lifecycle, notify

# A runner that stopped (its job is being cancelled, or requeued) has not ended the run: after a requeue it goes on,
# and a run whose session ended is stopped with the session's reason (runs_of_ended_sessions).
_STATES = {"running": BatchRun.State.RUNNING, "finished": BatchRun.State.FINISHED, "stopped": BatchRun.State.WAITING}
_REASONS = {
    "running": "the runner is sending the prompts",
    "finished": "the runner answered every prompt",
    "stopped": "the runner stopped with its job; it goes on if the job is requeued",
}
_COUNTS = ("done", "failed", "prompt_tokens", "completion_tokens")


def _count(report: dict[str, Any], key: str) -> int:
    value = report.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def apply(
    session_ids: list[str], reports: dict[str, dict[str, Any]], errors: dict[str, str] | None = None
) -> list[str]:
    """Record each report on its run, if the run belongs to one of these sessions (a file on the cluster names no
    run of anyone else's); returns the runs that ended now. A run that ended stays ended. `errors`: runs whose
    runner the job gave up on, and why."""
    ended: list[str] = []
    errors = errors or {}
    runs = BatchRun.objects.filter(pk__in=[*reports, *errors], session_id__in=session_ids)
    for run in runs.exclude(state__in=BatchRun.END_STATES):
        report = reports.get(str(run.pk), {})
        fields: dict[str, Any] = {}
        if report:  # a run the job gave up on before its runner wrote anything has no report
            fields = {key: min(_count(report, key), 2**62) for key in _COUNTS}
            fields["done"] = min(fields["done"], run.prompts)
            fields["failed"] = min(fields["failed"], run.prompts - fields["done"])
            rate = report.get("tokens_per_s")
            fields["tokens_per_s"] = float(rate) if isinstance(rate, (int, float)) and rate >= 0 else 0.0
        reported = str(report.get("state"))
        state = _STATES.get(reported, BatchRun.State(run.state))
        reason = _REASONS.get(reported, "the runner reported")
        if reported == "stopped" and run.stop_requested_at is not None:
            state = BatchRun.State.STOPPED
            reason = fields["end_reason"] = "stopped at your request; what was answered is kept"
        if str(run.pk) in errors:
            state = BatchRun.State.FAILED
            reason = fields["end_reason"] = f"the job gave the run up: {errors[str(run.pk)]}"[:2000]
        started = report.get("started_at")
        if run.started_at is None and isinstance(started, (int, float)):
            fields["started_at"] = datetime.fromtimestamp(started, tz=UTC)
        if state == run.state and all(getattr(run, key) == value for key, value in fields.items()):
            continue  # nothing new: no write
        if transition_run(run.pk, state, reason=reason, **fields) and state in BatchRun.END_STATES:
            ended.append(str(run.pk))
    return ended


def runs_of_ended_sessions() -> list[str]:
    """Runs whose session's job has ended without finishing them stop there, with the session's reason (what was
    answered is kept on the cluster); returns them."""
    ended: list[str] = []
    open_runs = BatchRun.objects.exclude(state__in=BatchRun.END_STATES).filter(session__state__in=END_STATES)
    for run in open_runs.select_related("session"):
        state = BatchRun.State.STOPPED if run.session.state == State.CANCELLED else BatchRun.State.FAILED
        reason = f"the session ended before the run did: {run.session.end_reason or run.session.get_state_display()}"
        if transition_run(run.pk, state, reason=reason, end_reason=reason[:2000]):
            ended.append(str(run.pk))
    return ended


def after_poll(polled: lifecycle.Polled) -> list[str]:
    """What an account's poll read, on the batch runs; every caller of lifecycle.poll that keeps runs moving passes
    this along (the poll, watch and cancel tasks). Returns the runs that ended now.

    1. Each report and runner error read, on its run (apply), for the sessions polled only.
    2. The runs whose session has ended without them, stopped with the session's reason.
    3. Their owners told that they ended (once each: notify.batch_ended claims it).

    A poll that could not read the cluster changes no run: its sessions went unknown, not ended."""
    if polled.read is None:
        return []
    ended: list[str] = []
    if polled.read.progress or polled.read.batch_errors:
        ended += apply(polled.session_ids, polled.read.progress, polled.read.batch_errors)
    ended += runs_of_ended_sessions()
    for run_id in ended:
        notify.batch_ended(run_id)
    return ended
