"""A fine-tune run's life on the cluster, as plain functions the Celery tasks call: submit, poll, cancel.

The run's job has a directory named by its uuid as a session's is, so the sessions' own cluster commands serve it
(jobs/cluster/remote.py: the submit under its lock with the job_id file and the lookup by name, the framed poll, the
cancel with its mark). As a session's: the submit is claimed with a conditional UPDATE, every state change goes through
transition_finetune(), a conditional UPDATE too, a transient error is retried and a permanent one fails the run with
the reason, and a poll the scheduler did not answer changes nothing (the run keeps its state until it answers).
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from catalog.models import ClusterAccount, ClusterRuntime, VariantLocation
from jobs.cluster import jobscript, layout, remote
from jobs.finetune import progress
from jobs.finetune.forms import signal_lead_s
from jobs.models import FineTuneRun, transition_finetune
from jobs.models.sessions import new_api_key
from jobs.operations import metrics
from jobs.sessions import notify
from jobs.sessions.lifecycle import aware
from portal import ssh
from portal.slurm import jobstates, times

log = logging.getLogger(__name__)
Run = FineTuneRun.State
# What the trainer reads from the run's settings file (jobs/cluster/scripts/finetune.py's SETTINGS), from its columns.
SETTINGS = ("method", "learning_rate", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "max_seq_length",
            "batch_size", "gradient_accumulation", "gradient_checkpointing", "checkpoint_every", "seed", "precision",
            "data_format", "planned_steps")  # fmt: skip


def job_spec(run: FineTuneRun) -> jobscript.JobSpec:
    location = VariantLocation.objects.get(variant=run.variant, cluster=run.cluster)
    install, gpu = run.runtime, run.gpu_type
    return jobscript.JobSpec(
        session_id=str(run.pk),
        runtime=install.runtime.kind,
        partition=run.partition.name,
        account=run.account.effective_slurm_account,
        nodes=1,
        gpus_per_node=run.gpus_per_node,
        gres_type=gpu.gres_type or gpu.name,
        constraint=gpu.constraint,
        cpus_per_node=run.cpus_per_node,
        memory_gib=run.memory_gib,
        walltime_min=run.walltime_min,
        binary=install.binary,
        served_name=run.model_name.replace(":", "-"),
        context_length=run.max_seq_length,
        parallel=1,
        model_path=location.path,
        modules=tuple(install.modules.split()),
        # The runtime's own flags, which the trainer does not use: a restricted key's gate pins these values.
        default_flags=tuple(shlex.split(install.runtime.default_flags)),
        extra_flags=tuple(shlex.split(install.extra_flags)),
        trainer=True,
        signal_s=signal_lead_s(run.walltime_min),
        lora_converter=converter_of(run),
        parent_run=str(run.parent_id or ""),
    )


def converter_of(run: FineTuneRun) -> str:
    """llama.cpp's LoRA converter on the run's cluster (beside its llama-server), which turns the adapter into the
    GGUF llama.cpp sessions load; "" where the cluster has no llama.cpp, or the run makes no adapter."""
    if run.method == FineTuneRun.Method.FULL:
        return ""
    llama = ClusterRuntime.objects.filter(cluster=run.cluster, runtime__kind="llama.cpp").first()
    return jobscript.lora_converter(llama.binary) if llama is not None else ""


def settings_file(run: FineTuneRun) -> str:
    """The run's settings as the trainer reads them (one JSON object, every key of SETTINGS, the run's id and its
    parent's, "" when it trains a new adapter)."""
    ids = {"run": str(run.pk), "parent": str(run.parent_id or "")}
    return json.dumps({**ids, **{name: getattr(run, name) for name in SETTINGS}}, sort_keys=True)


def _claim(run_id: str, claim: str | None) -> bool:
    """Take the submit: a queued run nobody holds, or whose holder is this task (a retry) or stale (its worker died)."""
    stale = timezone.now() - timedelta(seconds=settings.PORTAL_SUBMIT_STALE_S)
    mine = Q(submit_claim=claim) if claim else Q(pk__in=[])
    free = Q(submit_claim="") | mine | Q(submit_claimed_at__lt=stale)
    return bool(
        FineTuneRun.objects.filter(free, pk=run_id, state=Run.QUEUED, cancel_requested_at__isnull=True).update(
            submit_claim=claim or "-", submit_claimed_at=timezone.now()
        )
    )


def fail(run_id: str, reason: str, allowed: set[FineTuneRun.State] | None = None) -> bool:
    ended = transition_finetune(run_id, Run.FAILED, reason=reason, allowed_from=allowed, end_reason=reason[:2000])
    if ended:
        notify_ended(run_id)
    return ended


@dataclass(frozen=True)
class Submitted:
    outcome: str  # "not claimed", "failed", "retry", "cancelled", or the Slurm job id
    message: str = ""
    cancel_now: bool = False

    @property
    def retry(self) -> bool:
        return self.outcome == "retry"


def _files(run: FineTuneRun) -> dict[str, str]:
    files = jobscript.extra_files(run.runtime.runtime.kind, trainer=True)
    files[layout.NAMES.train_config_file] = settings_file(run)
    for name, stored in ((layout.NAMES.train_file, run.train_file), (layout.NAMES.valid_file, run.valid_file)):
        if stored:
            with stored.open("rb") as f:
                files[name] = f.read().decode()
    return files


@sensitive_variables("payload")
def submit(run_id: str, claim: str | None) -> Submitted:
    """Stage the run's directory (the job script, the trainer, the data and settings) and sbatch the job, at most once.

    1. Claim the run. 2. Render the script. 3. One SSH command (remote.SUBMIT_SCRIPT): lock, reuse a job already
    submitted for the run, else unpack and sbatch. 4. submitted with the job id, failed with Slurm's message, or
    "retry" on a transient error."""
    if not _claim(run_id, claim):
        return Submitted("not claimed")
    run = FineTuneRun.objects.select_related(
        "account__cluster", "cluster", "partition", "gpu_type", "variant__model", "runtime__runtime", "owner"
    ).get(pk=run_id)
    try:
        script = jobscript.render(job_spec(run))
        files = _files(run)
    except (jobscript.RenderError, ValueError, OSError, VariantLocation.DoesNotExist) as exc:
        fail(run_id, f"cannot write the job script: {exc}", {Run.QUEUED})
        return Submitted("failed")
    payload = remote.submit_payload(script, new_api_key(), files)
    account = run.account
    command = remote.submit_command(run_id, payload.sha256, account.cluster.slurm_cli, gated=account.restricted)
    try:
        result = account.run(command, stdin=payload.stdin, timeout_s=120)
    except ssh.SSHError as exc:
        metrics.ssh_error(run.cluster.slug, "submit")
        if not exc.transient:
            fail(run_id, f"cannot log in to {run.cluster.name}: {exc}", {Run.QUEUED})
            return Submitted("failed")
        return Submitted("retry", f"SSH: {exc}")
    reply = remote.read_submit(result.exit_code, result.stdout, result.stderr)
    if reply.refused:
        fail(run_id, f"Slurm refused the job: {reply.refused}", {Run.QUEUED})
        return Submitted("failed")
    if (outcome := reply.outcome) is None:
        return Submitted("retry", reply.retry)
    if outcome.cancelled:
        why = "cancelled while it was being submitted; no job was created"
        transition_finetune(run_id, Run.CANCELLED, reason=why, allowed_from={Run.QUEUED}, end_reason=why)
        return Submitted("cancelled")
    cause = f"found job {outcome.job_id} submitted earlier" if outcome.existing else "sbatch accepted the job"
    moved = transition_finetune(
        run_id, Run.SUBMITTED, reason=f"{cause} (job {outcome.job_id})", allowed_from={Run.QUEUED},
        job_id=outcome.job_id, submit_claim="", submitted_at=timezone.now(),
    )  # fmt: skip
    cancel_now = moved and FineTuneRun.objects.filter(pk=run_id, cancel_requested_at__isnull=False).exists()
    return Submitted(outcome.job_id, cancel_now=cancel_now)


def lost_submits() -> list[str]:
    """Runs whose submit was lost (a worker killed mid-submit, a web process that died before enqueueing it)."""
    stale = timezone.now() - timedelta(seconds=settings.PORTAL_SUBMIT_STALE_S)
    lost = FineTuneRun.objects.filter(
        Q(submit_claim="", created_at__lt=stale) | Q(submit_claimed_at__lt=stale),
        state=Run.QUEUED, cancel_requested_at__isnull=True,
    )  # fmt: skip
    return [str(pk) for pk in lost.values_list("pk", flat=True)]


# --- cancel ---------------------------------------------------------------------------------------------------


def mark_cancel(run_id: str) -> bool:
    """Record that a run should end; True when its job must still be cancelled on the cluster (False: no worker had
    claimed its submit, and it ended here at once). Once marked no worker claims it (_claim), so a run found unclaimed
    after the mark stays so."""
    FineTuneRun.objects.filter(pk=run_id, cancel_requested_at__isnull=True).update(cancel_requested_at=timezone.now())
    if FineTuneRun.objects.filter(pk=run_id, state=Run.QUEUED).exclude(submit_claim="").exists():
        return True
    why = "cancelled before it was submitted"
    return not transition_finetune(run_id, Run.CANCELLED, reason=why, allowed_from={Run.QUEUED}, end_reason=why)


def cancel(run_id: str) -> str | None:
    """Cancel the run's job (remote.CANCEL_SCRIPT: a mark under the submit lock, then scancel by id and by name), then
    poll its account once. The end state once it has ended, else None (the task tries again)."""
    run = FineTuneRun.objects.select_related("account__cluster").get(pk=run_id)
    if run.is_ended:
        return run.state
    account = run.account
    try:
        command = remote.cancel_command(run_id, run.job_id, account.cluster.slurm_cli, gated=account.restricted)
        result = account.run(command, timeout_s=90)
    except ssh.SSHError as exc:
        metrics.ssh_error(account.cluster.slug, "cancel")
        log.warning("cancel of fine-tune run %s will be retried: %s", run_id, exc)
        return None
    if result.exit_code != 0 or "marked" not in result.stdout:
        log.warning("cancel of fine-tune run %s will be retried: %s", run_id, result.stderr.strip()[:300])
        return None
    why = "cancelled from the portal"
    if not run.job_id and transition_finetune(
        run_id, Run.CANCELLED, reason=f"{why} while it was being submitted", allowed_from={Run.QUEUED}, end_reason=why
    ):
        return Run.CANCELLED
    try:
        poll(run.account_id)
    except ssh.SSHError as exc:
        log.warning("the poll after cancelling fine-tune run %s failed: %s", run_id, exc)
    run.refresh_from_db(fields=["state"])
    return run.state if run.is_ended else None


# --- poll -----------------------------------------------------------------------------------------------------


def accounts_to_poll() -> list[int]:
    live = FineTuneRun.objects.filter(state__in=FineTuneRun.POLLED_STATES).exclude(job_id="")
    return sorted(set(live.values_list("account_id", flat=True)))


def poll(account_id: int) -> int:
    """One SSH command for the account's live runs (remote.POLL_SCRIPT, which reads each run's progress file too);
    apply what Slurm and the trainer say to each. Returns how many changed."""
    account = ClusterAccount.objects.select_related("cluster").get(pk=account_id)
    runs = list(FineTuneRun.objects.filter(account=account, state__in=FineTuneRun.POLLED_STATES).exclude(job_id=""))
    if not runs:
        return 0
    framed = remote.poll_command(
        [(str(r.pk), r.job_id) for r in runs], account.cluster.slurm_cli, order=False, gated=account.restricted
    )
    try:
        result = account.run(framed.command, stdin=framed.stdin, timeout_s=60)
    except ssh.SSHError as exc:
        metrics.ssh_error(account.cluster.slug, "poll")
        log.warning("fine-tune runs of account %s not polled: %s", account_id, exc)
        return 0
    polled = remote.parse_poll(result.stdout, framed.frame)
    if not polled.squeue_ok or not polled.complete:
        log.warning("fine-tune runs of account %s not polled: %s", account_id, polled.squeue_error or "cut short")
        return 0  # the scheduler could not be asked: nothing ends, nothing moves
    return sum(apply_poll(run, polled) for run in runs)


def _progress_fields(run: FineTuneRun, raw: dict[str, object] | None) -> tuple[progress.Report | None, dict[str, Any]]:
    report = progress.clean(raw, run.planned_steps) if raw is not None else None
    if report is None:
        return None, {}
    fields = progress.run_fields(report)
    if any(getattr(run, name) != value for name, value in fields.items()):
        fields["progress_at"] = timezone.now()
        return report, fields
    return report, {}


def apply_poll(run: FineTuneRun, polled: remote.PollResult) -> int:
    """Move one run to what the poll says; 1 if it changed."""
    rid = str(run.pk)
    report, fields = _progress_fields(run, polled.training.get(rid))
    queued = polled.queued.get(run.job_id)
    if queued is not None:
        fields["last_seen_at"] = timezone.now()
        if queued.state in jobstates.PENDING_STATES:
            requeued = run.state == Run.RUNNING
            why = f"Slurm: pending ({queued.reason or 'no reason given'})"
            if requeued:
                why = f"Slurm requeued the job: it waits to start again, then goes on from its last checkpoint ({why})"
            return int(transition_finetune(rid, Run.SUBMITTED, reason=why, slurm_reason=queued.reason[:200], **fields))
        if queued.state not in jobstates.ACTIVE_STATES:
            return 0
        nodes = queued.node_list if queued.node_list not in {"", "(null)"} else ""
        started = aware(queued.start_time)
        if run.started_at is None and started is not None:
            fields["started_at"] = started
        why = f"Slurm: running on {nodes or 'its node'}, training"
        return int(transition_finetune(rid, Run.RUNNING, reason=why, node_list=nodes, slurm_reason="", **fields))
    record = polled.finished.get(run.job_id)
    if record is not None:
        slurm_state = jobstates.base_state(record.get("JobState", ""))
        if slurm_state not in jobstates.FINISHED_STATES:
            return 0
        return int(_end(run, slurm_state, record, report, fields, polled.errors.get(rid, "")))
    if run.job_id in polled.asked_gone:
        seen = run.last_seen_at or run.submitted_at or run.created_at
        if timezone.now() - seen > timedelta(seconds=settings.PORTAL_JOB_LOST_AFTER_S):
            return int(fail(rid, polled.errors.get(rid) or "Slurm no longer knows this job and kept no record of it"))
    return 0


def _end(
    run: FineTuneRun,
    slurm_state: str,
    record: dict[str, str],
    report: progress.Report | None,
    fields: dict[str, Any],
    error: str,
) -> bool:
    rid = str(run.pk)
    ended = aware(times.parse_time(record.get("EndTime", "")))
    if ended:
        fields["finished_at"] = ended
    if run.started_at is None and (started := aware(times.parse_time(record.get("StartTime", "")))):
        fields["started_at"] = started
    step = report.step if report else run.step
    if slurm_state == "COMPLETED" and report and report.state == "completed" and step == run.planned_steps:
        target, reason = Run.COMPLETED, f"the trainer trained all {run.planned_steps} steps and wrote the adapter"
    elif slurm_state == "CANCELLED":
        target = Run.CANCELLED
        reason = "cancelled from the portal" if run.cancel_requested_at else "cancelled (scancel outside the portal)"
    elif slurm_state in ("TIMEOUT", "DEADLINE"):
        target = Run.FAILED
        reason = (f"the job reached its time limit of {run.walltime_min} min at step {step} of {run.planned_steps}; "
                  "its checkpoints are kept")  # fmt: skip
    else:
        target = Run.FAILED
        reason = error.strip() or (
            f"Slurm: {slurm_state} (exit code {record.get('ExitCode', '?')}) at step {step} of {run.planned_steps}"
        )
        if slurm_state == "COMPLETED" and not error.strip():
            reason = f"the job ended at step {step} of {run.planned_steps} without the trainer's final report"
    moved = transition_finetune(rid, target, reason=f"Slurm: {slurm_state}; {reason}", end_reason=reason[:2000],
                                **fields)  # fmt: skip
    if moved:
        notify_ended(rid)
    return moved


def notify_ended(run_id: str) -> bool:
    """The run ended: its figures to the owner, once (the row is claimed first), when it was started with email
    notices (the sessions' own mail, jobs.sessions.notify)."""
    claimed = FineTuneRun.objects.filter(pk=run_id, notify_email=True, notified_at__isnull=True).update(
        notified_at=timezone.now()
    )
    if not claimed:
        return False
    run = FineTuneRun.objects.select_related("owner", "variant__model").get(pk=run_id)
    losses = ", ".join(
        f"{label} loss {value:.4f}" for label, value in (("training", run.train_loss), ("validation", run.valid_loss))
        if value is not None
    )  # fmt: skip
    notify.send_to(
        run.owner,
        f"Fine-tune run {run.model_name}: {run.get_state_display()}",
        f"Your fine-tune run of {run.variant.model.name} ({run.get_method_display()}) on {run.name} "
        f"{run.get_state_display()}{': ' + run.end_reason if run.end_reason else ''}.\n\n"
        f"Step {run.step} of {run.planned_steps}{'; ' + losses if losses else ''}; {run.gpu_hours:.2f} GPU-hours.\n\n"
        f"{settings.PORTAL_BASE_URL}/finetune/{run.pk}/\n",
    )
    return True
