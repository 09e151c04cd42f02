"""A session's life on the cluster, as plain functions the Celery tasks (jobs/tasks.py) call: submit, poll, cancel.

Nothing here enqueues work or knows Celery; a function returns what happened and the task decides what follows
(a retry, a cancel after a submit). Every state change goes through models.transition(), a conditional UPDATE, and
the submit is claimed by one too. A failing SSH connection or scheduler command never ends a session: it leaves it
`unknown` until the scheduler answers again.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import F, Q
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from catalog.models import ClusterAccount, ClusterRuntime, VariantLocation
from jobs.cluster import backend, jobscript, layout, remote
from jobs.models import END_STATES, POLLED_STATES, BatchRun, LLMSession, Purpose, SessionEvent, State, transition
from jobs.operations import metrics
from jobs.sessions import adapter_copies as copies
from jobs.sessions import listed_nodes, notify, queue_order, staging
from portal import crypto, nodenet, shellsafe, ssh
from portal.slurm import jobstates, times
from portal.slurm.squeue import QueuedJob

log = logging.getLogger(__name__)

CANCEL_REPEAT_AFTER = timedelta(seconds=60)


def job_spec(session: LLMSession) -> jobscript.JobSpec:
    """The job script's values for a session, from the session and the catalog."""
    cluster_runtime = ClusterRuntime.objects.get(cluster=session.cluster, runtime=session.runtime)
    location = VariantLocation.objects.get(variant=session.variant, cluster=session.cluster)
    gpu = session.gpu_type
    run = BatchRun.objects.filter(session=session, ends_session=True).first()
    stage_to = session.cluster.stage_to if session.runtime.rules.stages_weights and not session.skip_staging else ""
    memory_gib = session.memory_gib
    if stage_to.startswith("/dev/shm"):
        # A copy in memory counts against the job's memory (its cgroup on most sites): ask for room for it too.
        memory_gib += math.ceil(session.variant.size_gib)
    # The adapters in one order (llama-server numbers them so), with their ranks; those of another cluster user's
    # runs the submit copied into this one's home first (jobs/finetune/copies.py).
    runs = dict(session.adapters.order_by("pk").values_list("pk", "lora_rank"))
    copied = tuple(str(run.pk) for run in copies.copied_adapters(session)) if runs else ()
    return jobscript.JobSpec(
        session_id=str(session.pk),
        runtime=session.runtime.kind,
        partition=session.partition.name,
        account=session.account.effective_slurm_account,
        nodes=session.nodes,
        gpus_per_node=session.gpus_per_node,
        gres_type=gpu.gres_type or gpu.name,
        constraint=gpu.constraint,
        cpus_per_node=session.cpus_per_node,
        memory_gib=memory_gib,
        walltime_min=session.walltime_min,
        binary=cluster_runtime.binary,
        rpc_binary=cluster_runtime.rpc_binary,
        model_dir=cluster_runtime.model_dir,
        served_name=session.served_model_name,
        context_length=session.context_length,
        parallel=session.parallel,
        embeddings=session.purpose == Purpose.EMBEDDINGS,
        tool_call_parser=session.variant.model.tool_call_parser,
        batch_run=str(run.pk) if run else "",
        batch_concurrency=run.concurrency if run else 1,
        replicas=run.replicas if run else 1,
        model_path=location.path,
        ollama_tag=location.ollama_tag,
        stage_to=stage_to,
        stage_keep=session.cluster.stage_keep,
        modules=tuple(cluster_runtime.modules.split()),
        default_flags=tuple(shlex.split(session.runtime.default_flags)),
        extra_flags=tuple(shlex.split(cluster_runtime.extra_flags)),
        adapters=tuple(str(pk) for pk in runs),
        copied_adapters=copied,
        max_lora_rank=max_lora_rank(max(runs.values(), default=0)),
    )


# The ranks vLLM takes as --max-lora-rank (vllm/config/lora.py's MaxLoRARanks, 0.32).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def max_lora_rank(rank: int) -> int:
    """vLLM's --max-lora-rank for adapters of this rank at most: the smallest it takes that holds them."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


# --- submit ---------------------------------------------------------------------------------------------------


def claim_submit(session_id: str, claim: str | None) -> bool:
    """Take the submit: a pending session, or a submitting one whose claim is ours (a retry or redelivery of
    this same task) or stale (its worker died). The remote lock and job_id file make a double submit harmless
    anyway; the claim keeps two workers from doing the work twice."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.PORTAL_SUBMIT_STALE_S)
    mine = Q(submit_claim=claim) if claim else Q(pk__in=[])
    claimable = Q(state=State.PENDING) | Q(state=State.SUBMITTING) & (mine | Q(submit_claimed_at__lt=stale))
    row = LLMSession.objects.filter(pk=session_id).filter(claimable, cancel_requested_at__isnull=True)
    previous = row.values_list("state", flat=True).first()
    if previous is None:
        return False
    claimed = row.filter(state=previous).update(
        submit_claim=claim or "", submit_claimed_at=now, submit_attempts=F("submit_attempts") + 1
    )
    if claimed and previous == State.PENDING:
        transition(session_id, State.SUBMITTING, cause="a worker is submitting the job", allowed_from={State.PENDING})
    return bool(claimed)


def fail(session_id: str, reason: str, allowed: set[State] | None = None) -> None:
    transition(session_id, State.FAILED, cause=reason, allowed_from=allowed, end_reason=reason)


@dataclass(frozen=True)
class Submitted:
    outcome: str  # "not claimed", "failed", "retry", or the Slurm job id
    message: str = ""  # why, for a retry
    cancel_now: bool = False  # a cancel was asked for while the job was being submitted

    @property
    def retry(self) -> bool:
        return self.outcome == "retry"


@sensitive_variables("payload")
def submit(session_id: str, claim: str | None) -> Submitted:
    """Stage the session directory and sbatch the job, at most once per session.

    1. Claim the session (conditional UPDATE). 2. Render the script. 3. One SSH command: lock, reuse a job
    already submitted for this session (job_id file, or squeue by name), else unpack and sbatch.
    4. queued with the job id, or failed with Slurm's message, or "retry" on a transient error.
    """
    if not claim_submit(session_id, claim):
        return Submitted("not claimed")
    session = LLMSession.objects.select_related(
        "account__cluster", "cluster", "partition", "gpu_type", "variant__model", "runtime"
    ).get(pk=session_id)
    try:
        spec = job_spec(session)
        script = jobscript.render(spec)
    except (jobscript.RenderError, ValueError) as exc:
        fail(session_id, f"cannot write the job script: {exc}", {State.SUBMITTING})
        return Submitted("failed")
    except Exception as exc:  # a catalog entry deleted under us
        fail(session_id, f"the catalog no longer describes this session: {exc}", {State.SUBMITTING})
        return Submitted("failed")
    if spec.copied_adapters:
        try:
            copies.copy_adapters(session)
        except copies.CopyRefused as exc:
            fail(session_id, f"cannot copy a shared adapter into {session.account.username}'s home: {exc}",
                 {State.SUBMITTING})  # fmt: skip
            return Submitted("failed")
        except ssh.SSHError as exc:
            metrics.ssh_error(session.cluster.slug, "submit")
            if not exc.transient:
                fail(session_id, f"cannot copy a shared adapter: {exc}", {State.SUBMITTING})
                return Submitted("failed")
            return Submitted("retry", f"copying a shared adapter: {exc}")
    files = jobscript.extra_files(spec.runtime, batch=bool(spec.batch_run))
    if spec.batch_run:  # the checked requests go with the job: the runner reads them on the node
        with BatchRun.objects.get(pk=spec.batch_run).requests.open("rb") as requests:
            run_files = f"{layout.NAMES.batch_dir}/{spec.batch_run}/{layout.NAMES.requests_file}"
            files[run_files] = requests.read().decode()
    payload = remote.submit_payload(script, session.api_key, files)
    account = session.account
    command = remote.submit_command(session_id, payload.sha256, account.cluster.slurm_cli, gated=account.restricted)
    try:
        result = account.run(command, stdin=payload.stdin, timeout_s=120)
    except ssh.SSHError as exc:
        metrics.ssh_error(session.cluster.slug, "submit")
        if not exc.transient:
            fail(session_id, f"cannot log in to {session.cluster.name}: {exc}", {State.SUBMITTING})
            return Submitted("failed")
        return Submitted("retry", f"SSH: {exc}")
    reply = remote.read_submit(result.exit_code, result.stdout, result.stderr)
    if reply.refused:
        fail(session_id, f"Slurm refused the job: {reply.refused}", {State.SUBMITTING})
        return Submitted("failed")
    if (outcome := reply.outcome) is None:
        return Submitted("retry", reply.retry)
    if outcome.cancelled:  # a cancel marked the session on the cluster first: sbatch was never called
        why = "cancelled while it was being submitted; no job was created"
        transition(session_id, State.CANCELLED, cause=why, allowed_from={State.SUBMITTING}, end_reason=why)
        return Submitted("cancelled")
    cause = f"found job {outcome.job_id} submitted earlier" if outcome.existing else "sbatch accepted the job"
    moved = transition(
        session_id,
        State.QUEUED,
        cause=f"{cause} (job {outcome.job_id})",
        allowed_from={State.SUBMITTING},
        job_id=outcome.job_id,
        submit_claim="",
    )
    cancel_now = moved and LLMSession.objects.filter(pk=session_id, cancel_requested_at__isnull=False).exists()
    return Submitted(outcome.job_id, cancel_now=cancel_now)


def lost_submits() -> list[str]:
    """Sessions whose submit was lost: a worker killed mid-submit, or a web process that died before enqueueing."""
    stale = timezone.now() - timedelta(seconds=settings.PORTAL_SUBMIT_STALE_S)
    lost = LLMSession.objects.filter(
        Q(state=State.PENDING, created_at__lt=stale) | Q(state=State.SUBMITTING, submit_claimed_at__lt=stale),
        cancel_requested_at__isnull=True,
    ).values_list("pk", flat=True)
    return [str(pk) for pk in lost]


# --- cancel ---------------------------------------------------------------------------------------------------


def mark_cancel(session_id: uuid.UUID | str, cause: str, end_reason: str) -> bool:
    """Record that a session should end; True when its job must still be cancelled with scancel (False when it
    was never submitted and has ended here at once). `cause` goes into the history, `end_reason` onto the card."""
    LLMSession.objects.filter(pk=session_id, cancel_requested_at__isnull=True).update(
        cancel_requested_at=timezone.now(), cancel_reason=end_reason[:200]
    )
    return not transition(
        session_id, State.CANCELLED, cause=f"{cause} (before submission)", allowed_from={State.PENDING}
    )


def idle_sessions() -> list[LLMSession]:
    """Running sessions whose owner asked for an idle cancel and that saw no request for that many minutes."""
    now = timezone.now()
    running = LLMSession.objects.filter(state=State.RUNNING, idle_cancel_min__isnull=False, cancel_requested_at=None)
    idle = []
    for session in running:
        last = session.last_activity_at or session.ready_at or session.state_changed_at
        assert session.idle_cancel_min is not None
        if now - last >= timedelta(minutes=session.idle_cancel_min):
            idle.append(session)
    return idle


def cancel(session_id: str, *, after_poll: AfterPoll) -> str | None:
    """End a session's job: mark the session cancelled on the cluster and scancel its job, by id and by name (one
    command, under the submit lock; see remote.CANCEL_SCRIPT), then poll its account once (and `after_poll` what it
    read). The end state once it has ended, else None (the task tries again).

    A session still being submitted ends here at once: after the mark no submit can create a job, and any job one
    created before it (whose reply may have been lost) was cancelled by name."""
    session = LLMSession.objects.select_related("account__cluster").get(pk=session_id)
    if session.state in END_STATES:
        return session.state
    if session.state == State.PENDING:
        transition(session_id, State.CANCELLED, cause="cancelled before submission", allowed_from={State.PENDING})
        return State.CANCELLED
    try:
        account = session.account
        cli = account.cluster.slurm_cli
        result = account.run(
            remote.cancel_command(session_id, session.job_id, cli, gated=account.restricted), timeout_s=90
        )
    except ssh.SSHError as exc:
        metrics.ssh_error(session.account.cluster.slug, "cancel")
        log.warning("cancel of %s will be retried: %s", session_id, exc)
        return None
    if result.exit_code != 0 or "marked" not in result.stdout:
        log.warning("cancel of %s will be retried: %s", session_id, result.stderr.strip()[:300])
        return None
    why = session.cancel_reason or "cancelled from the portal"
    submitting = {State.SUBMITTING}
    cause = f"{why} while it was being submitted"
    if not session.job_id and transition(
        session_id, State.CANCELLED, cause=cause, allowed_from=submitting, end_reason=why
    ):
        return State.CANCELLED
    try:
        after_poll(poll(session.account_id))
    except ssh.SSHError as exc:
        log.warning("the poll after cancelling %s failed: %s", session_id, exc)
    session.refresh_from_db(fields=["state"])
    return session.state if session.state in END_STATES else None


def lost_cancels() -> list[str]:
    """Sessions a cancel was asked for over a minute ago that never got a job id (their cancel task gave up while
    the cluster was away): ask again, or they would stay submitting for ever."""
    overdue = timezone.now() - CANCEL_REPEAT_AFTER
    stuck = LLMSession.objects.filter(state=State.SUBMITTING, job_id="", cancel_requested_at__lt=overdue)
    return [str(pk) for pk in stuck.values_list("pk", flat=True)]


# --- poll -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Polled:
    """One account's poll: its counts, and, when the cluster answered, the sessions polled and what was read of them
    beyond their own states (the batch runners' progress and errors). The batch engine sits above the sessions, so
    the caller applies those (jobs.batch.progress.after_poll, from the tasks)."""

    counts: dict[str, int]
    session_ids: list[str] = field(default_factory=list)
    read: remote.PollResult | None = None


AfterPoll = Callable[[Polled], object]  # what a poll's caller does with what it read (watch and cancel poll too)


def poll(account_id: int) -> Polled:
    """One SSH command for all live sessions of one account; apply what Slurm says to each."""
    account = ClusterAccount.objects.select_related("cluster").get(pk=account_id)
    live = LLMSession.objects.filter(account=account, state__in=POLLED_STATES).exclude(job_id="")
    sessions = list(live.select_related("cluster").order_by("created_at"))  # each address is checked by its cluster
    if not sessions:
        return Polled({"sessions": 0})
    pending = [s.job_id for s in sessions if s.state in (State.QUEUED, State.UNKNOWN)]  # as far as the portal knows
    read = queue_order.to_read(account.cluster_id, pending)
    command = remote.poll_command(
        [(str(s.pk), s.job_id) for s in sessions], account.cluster.slurm_cli, order=bool(read), gated=account.restricted
    )
    try:
        with metrics.polling(account.cluster.slug):
            result = account.run(command.command, stdin=command.stdin, timeout_s=60)
    except ssh.SSHError as exc:
        metrics.poll_failed(account.cluster.slug, "ssh")
        _mark_unknown(sessions, f"cannot reach {account.cluster.name}: {exc}")
        return Polled({"sessions": len(sessions), "unknown": len(sessions)})
    polled = remote.parse_poll(result.stdout, command.frame)
    if not polled.squeue_ok or not polled.complete:
        metrics.poll_failed(account.cluster.slug, "scheduler")
        detail = polled.squeue_error or result.stderr.strip()[:300] or f"exit code {result.exit_code}"
        _mark_unknown(sessions, f"squeue failed on {account.cluster.name}: {detail}")
        return Polled({"sessions": len(sessions), "unknown": len(sessions)})
    queue_order.share(account.cluster_id, polled, read, pending)
    seen = [s.pk for s in sessions if s.job_id in polled.queued]
    if seen:
        LLMSession.objects.filter(pk__in=seen).update(last_seen_at=timezone.now())
    changed = sum(apply_poll(session, polled) for session in sessions)
    _record_staging(sessions, polled.staging)
    _repeat_lost_cancels(account, sessions, polled)
    return Polled({"sessions": len(sessions), "changed": changed}, [str(s.pk) for s in sessions], polled)


# --- watch: Running within a second of the server's health check ----------------------------------------------


# Queued too: a small model loads in a second, often before the poll has seen its job start.
WATCHED_STATES = (State.QUEUED, State.STARTING, State.RUNNING)


def accounts_to_watch() -> list[int]:
    """The accounts with submitted sessions whose server may start or stop: queued, starting or running."""
    live = LLMSession.objects.filter(state__in=WATCHED_STATES).exclude(job_id="")
    return sorted(set(live.values_list("account_id", flat=True)))


ENDING_POLL_S = 0.5  # how often a job seen stopping is polled until Slurm says it ended
ENDING_FOR_S = 10.0  # and for how long at most (a server restarting in the same job never ends)


WATCH_ROUND_S = 3  # one waiting command's longest wait: sessions submitted meanwhile join at the next round
WATCH_IDLE_S = 0.5  # how often an account with nothing to watch is looked at again


def watch(account_id: int, seconds: float, *, after_poll: AfterPoll) -> int:
    """For up to `seconds`, one waiting command at a time on the login host (remote.WATCH_SCRIPT, at most
    WATCH_ROUND_S each) for the account's queued, starting and running sessions; when one changes the account is
    polled at once instead of at the next beat: a server that answers its health check shows Running within a second.
    A job seen stopping (its error file, or its connection file gone) is polled every ENDING_POLL_S until Slurm says
    it ended, so the end shows as soon. Each poll is followed by `after_poll` with what it read. Returns the number of
    polls. Whatever fails here is left to the regular poll, which also marks sessions unknown when the cluster cannot
    be reached."""
    deadline = time.monotonic() + seconds
    account = ClusterAccount.objects.select_related("cluster").get(pk=account_id)
    settled: set[str] = set()  # changed, polled, and still in the same mode (e.g. an address the poll refused)
    polls = 0
    while (left := deadline - time.monotonic()) >= 1:
        rows = LLMSession.objects.filter(account_id=account_id, state__in=WATCHED_STATES)
        watched = [
            (str(pk), "running" if state == State.RUNNING and host else "starting")
            for pk, state, host in rows.exclude(job_id="").values_list("pk", "state", "host")
        ]
        watched = [(sid, mode) for sid, mode in watched if f"{sid}:{mode}" not in settled]
        if not watched:
            time.sleep(WATCH_IDLE_S)
            continue
        wait_s = int(min(left, WATCH_ROUND_S))
        try:
            command = remote.watch_command(watched, wait_s, gated=account.restricted)
            result = account.run(command, timeout_s=wait_s + 30)
        except ssh.SSHError:
            break
        changed = remote.parse_watch(result.stdout)
        if not changed:
            continue
        after_poll(poll(account_id))
        polls += 1
        stopping = [sid for sid, what in changed.items() if what != "ready"]
        polls += _until_ended(account_id, stopping, min(ENDING_FOR_S, deadline - time.monotonic()), after_poll)
        settled |= {f"{sid}:{mode}" for sid, mode in watched if sid in changed}
    return polls


def _until_ended(account_id: int, session_ids: list[str], seconds: float, after_poll: AfterPoll) -> int:
    """Poll every ENDING_POLL_S while any of these sessions' jobs is still live in the portal, for `seconds` at most."""
    polls, deadline = 0, time.monotonic() + seconds
    while session_ids and time.monotonic() < deadline:
        if not LLMSession.objects.filter(pk__in=session_ids).exclude(state__in=END_STATES).exists():
            break
        time.sleep(ENDING_POLL_S)
        after_poll(poll(account_id))
        polls += 1
    return polls


def _record_staging(sessions: list[LLMSession], reports: dict[str, dict[str, object]]) -> None:
    """Each job's staging report, kept when it changed (the card's progress line reads it)."""
    for session in sessions:
        raw = reports.get(str(session.pk))
        report = staging.clean(raw) if raw is not None else None
        if report is not None and report != session.staging:
            LLMSession.objects.filter(pk=session.pk).update(staging=report)


def _repeat_lost_cancels(account: ClusterAccount, sessions: list[LLMSession], polled: remote.PollResult) -> None:
    """A cancel whose task gave up (the cluster was away for minutes) is not forgotten: scancel again."""
    overdue = timezone.now() - CANCEL_REPEAT_AFTER
    job_ids = [
        s.job_id
        for s in sessions
        if s.cancel_requested_at and s.cancel_requested_at < overdue and s.job_id in polled.queued
    ]
    if job_ids:
        log.warning("repeating scancel for %s on %s", job_ids, account.cluster.slug)
        try:
            account.run(
                remote.scancel_command(job_ids, account.cluster.slurm_cli, gated=account.restricted), timeout_s=30
            )
        except ssh.SSHError as exc:
            metrics.ssh_error(account.cluster.slug, "cancel")
            log.warning("scancel failed: %s", exc)


def _mark_unknown(sessions: list[LLMSession], cause: str) -> None:
    """The scheduler cannot be asked: nothing ends. A running session whose server still answers keeps serving its
    chat and API while unknown; one whose server does not is no longer sent requests."""
    for session in sessions:
        if session.state == State.RUNNING:
            if backend.answers(session):
                why = f"{cause}; its server still answers, so its chat and API go on"
                transition(session.pk, State.UNKNOWN, cause=why, allowed_from={State.RUNNING})
            else:
                why = f"{cause}; its server does not answer either"
                transition(session.pk, State.UNKNOWN, cause=why, allowed_from={State.RUNNING}, host="", port=None)
            continue
        transition(session.pk, State.UNKNOWN, cause=cause, allowed_from={State.QUEUED, State.STARTING})


_END_FOR_SLURM = {
    "COMPLETED": State.COMPLETED,
    "CANCELLED": State.CANCELLED,
    "TIMEOUT": State.TIMEOUT,
    "DEADLINE": State.TIMEOUT,
}


# What the portal keeps of a job waiting in the queue, compared with what Slurm says before anything is written.
WAITING_FIELDS = ("state", "slurm_reason", "estimated_start", "queue_position")


def waiting_as(queued: QueuedJob, position: int | None) -> tuple[object, ...]:
    """WAITING_FIELDS as Slurm says them of a pending job (apply_poll; listing.py compares database rows with it)."""
    return (State.QUEUED, queued.reason, aware(queued.start_time), position)


def apply_poll(session: LLMSession, polled: remote.PollResult) -> int:
    """Move one session to what the poll says; return 1 if it changed. Writes nothing when nothing changed, so a
    cycle over a thousand waiting sessions costs a thousand comparisons, not a thousand UPDATEs."""
    sid = str(session.pk)
    queued = polled.queued.get(session.job_id)
    if queued is not None:
        nodes = queued.node_list if queued.node_list not in {"", "(null)"} else ""
        if queued.state in jobstates.PENDING_STATES:
            estimate = aware(queued.start_time)
            position = polled.queue_position(queued.partition, queued.job_id)
            if tuple(getattr(session, name) for name in WAITING_FIELDS) == waiting_as(queued, position):
                return 0
            fields: dict[str, Any] = {"slurm_reason": queued.reason, "estimated_start": estimate}
            fields["queue_position"] = position
            cause = f"Slurm: pending ({queued.reason or 'no reason given'})"
            if session.state in (State.STARTING, State.RUNNING) or session.host:
                # Requeued (preempted, or a node failed): the old address is no one's to send to any more.
                cause = f"Slurm requeued the job: it waits to start again ({queued.reason or 'no reason given'})"
                fields.update(host="", port=None, node_list="")
            allowed = {State.QUEUED, State.UNKNOWN, State.STARTING, State.RUNNING}
            return int(transition(sid, State.QUEUED, cause=cause, allowed_from=allowed, **fields))
        if queued.state not in jobstates.ACTIVE_STATES:
            return 0
        connection = polled.connections.get(sid)
        started = aware(queued.start_time)
        if connection is not None:
            return _serve_at(session, connection, nodes, polled, started)
        if queued.state == "COMPLETING" or (session.state, session.node_list, session.host) == (
            State.STARTING,
            nodes,
            "",
        ):
            return 0
        fields = {"node_list": nodes, "slurm_reason": "", "host": "", "port": None}
        if started and session.started_at is None:
            fields["started_at"] = started
        cause = f"Slurm: running on {nodes or 'its nodes'}, the model is loading"
        if session.host:  # it served, and its connection file is gone: the server restarted or stopped
            cause = "the server no longer says where it listens (it restarted or stopped): no requests until it does"
        return int(
            transition(
                sid,
                State.STARTING,
                cause=cause,
                allowed_from={State.QUEUED, State.UNKNOWN, State.STARTING, State.RUNNING},
                **fields,
            )
        )
    record = polled.finished.get(session.job_id)
    if record is not None:
        slurm_state = jobstates.base_state(record.get("JobState", ""))
        if slurm_state in jobstates.FINISHED_STATES:
            return int(_end(session, slurm_state, record, polled.errors.get(sid, "")))
        return 0
    if session.job_id in polled.asked_gone:
        # squeue, sacct and scontrol all answered and none knows the job: purged without a record.
        seen = session.last_seen_at or session.submitted_at or session.created_at
        if timezone.now() - seen > timedelta(seconds=settings.PORTAL_JOB_LOST_AFTER_S):
            reason = polled.errors.get(sid) or "Slurm no longer knows this job and kept no record of how it ended"
            return int(transition(sid, State.FAILED, cause=reason, end_reason=reason))
    return 0


def _serve_at(
    session: LLMSession, connection: dict[str, object], nodes: str, polled: remote.PollResult, started: datetime | None
) -> int:
    """The job says its server answers at an address: checked against the job's own nodes, then against the
    cluster's compute-node networks, which alone decide (the nodes and their addresses come through the owner's own
    account, whose shell its user controls); with a key of its own after a restart. The address stored is the one
    the portal resolved and checked (pinned), which every request then goes to. Returns 1 if the session changed.
    `started` is Slurm's own start time of the job (GPU-hours count from it)."""
    sid = str(session.pk)
    host, port, key = connection.get("host"), connection.get("port"), connection.get("key") or ""
    allowed = polled.addresses_of(nodes)
    if allowed is None:  # Slurm did not say which addresses the job's nodes have: decide at the next poll
        return 0
    refusal, address = "", ""
    # Whatever Slurm says of the nodes: a port, path or user info in the host never gets near a URL.
    if not shellsafe.network_host(host):
        refusal = f"refused the address {host!r} the job reported: not a host name or an IP address"
    elif not (isinstance(host, str) and host in allowed):
        refusal = f"refused the address {host!r} the job reported: not one of its nodes ({', '.join(sorted(allowed))})"
    elif not (isinstance(port, int) and not isinstance(port, bool) and 1024 <= port <= 65535):
        refusal = f"refused the port {port!r} the job reported: not one from 1024 to 65535"
    elif not (isinstance(key, str) and (not key or _API_KEY.fullmatch(key))):
        refusal = "refused the key the job reported: not one the portal makes"
    elif (listed := listed_nodes.listed(session.cluster_id, session.job_id)) and not listed_nodes.same_nodes(
        listed, nodes
    ):
        refusal = (f"refused the nodes {nodes} the job's poll reported: the cluster's status account lists the job "
                   f"on {listed}")  # fmt: skip
    else:
        try:
            address = nodenet.pin(host, nodenet.networks(session.cluster.node_networks))
        except nodenet.Refused as exc:
            refusal = f"refused the address {host!r} the job reported: {exc}"
    if refusal:
        if session.host:  # it was being sent requests: not any more (the transition records why)
            transition(
                sid, State.STARTING, cause=refusal, allowed_from={State.RUNNING, State.UNKNOWN}, host="", port=None
            )
            return 1
        _note(session, refusal)
        return 0
    assert isinstance(host, str) and isinstance(port, int) and isinstance(key, str)
    fresh_key = bool(key) and key != session.api_key
    if (session.state, session.host, session.port, session.node_list) == (State.RUNNING, address, port, nodes):
        if not fresh_key:
            return 0
    elif session.state == State.RUNNING and session.host:
        _note(session, f"the server moved from {session.host}:{session.port} to {address}:{port}")
    # A model that loads between two polls still passed through "starting": record it.
    at_start = {"started_at": started} if started and session.started_at is None else {}
    transition(sid, State.STARTING, cause=f"Slurm: running on {nodes}", allowed_from={State.QUEUED}, node_list=nodes,
               **at_start)  # fmt: skip
    fields: dict[str, Any] = {"host": address, "port": port, "node_list": nodes, "slurm_reason": ""}
    if fresh_key:
        fields["api_key_encrypted"] = crypto.encrypt(key)
    at = f"{host}:{port}" if host == address else f"{host}:{port} ({address})"
    moved = transition(
        sid,
        State.RUNNING,
        cause=f"the server answers its health check on {at}" + (" with a new key" if fresh_key else ""),
        allowed_from={State.QUEUED, State.STARTING, State.UNKNOWN, State.RUNNING},
        **fields,
    )
    if fresh_key and session.state == State.RUNNING:
        LLMSession.objects.filter(pk=sid).update(**fields)  # same state, so transition() wrote nothing
    if moved and session.notify_email:
        notify.session_running(sid)
    return int(moved)


_API_KEY = re.compile(r"sk-hpcllm-[A-Za-z0-9_-]{20,100}")


def _note(session: LLMSession, cause: str) -> None:
    """An event for what did not change the state (a refused or moved address), recorded once in a row."""
    last = session.events.order_by("-at", "-pk").first()
    if last is None or last.cause != cause[:500]:
        SessionEvent.objects.create(
            session=session, from_state=session.state, to_state=session.state, cause=cause[:500]
        )


def _end(session: LLMSession, slurm_state: str, record: dict[str, str], error: str) -> bool:
    sid = str(session.pk)
    target = _END_FOR_SLURM.get(slurm_state, State.FAILED)
    if target == State.COMPLETED and error:
        target = State.FAILED
    if target == State.CANCELLED:
        if session.cancel_requested_at:
            reason = session.cancel_reason or "cancelled from the portal"
        else:
            reason = "cancelled (scancel outside the portal)"
    elif target == State.TIMEOUT:
        reason = f"the job reached its time limit of {session.walltime_min} min"
    elif target == State.COMPLETED:
        reason = "the server exited"
    else:
        slurm_reason = record.get("Reason", "")
        reason = error or f"Slurm: {slurm_state} (exit code {record.get('ExitCode', '?')}" + (
            f", {slurm_reason})" if slurm_reason and slurm_reason != "None" else ")"
        )
    fields: dict[str, Any] = {"end_reason": reason}
    ended = aware(times.parse_time(record.get("EndTime", "")))
    if ended:
        fields["ended_at"] = ended
    return transition(sid, target, cause=f"Slurm: {slurm_state}; {reason}", **fields)


def aware(value: datetime | None) -> datetime | None:
    """A time from Slurm's output (naive: the portal's time zone is the cluster's) as an aware datetime."""
    if value is None:
        return None
    return timezone.make_aware(value) if timezone.is_naive(value) else value
