"""What people do to fine-tune runs, the one path for the pages, `manage.py finetune` and the admin: start one, cancel
one. Each writes the database and enqueues the worker's part once the write commits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.files import File
from django.db import IntegrityError, transaction
from django.utils.datastructures import MultiValueDict

from jobs import tasks
from jobs.allocations import check as allocations
from jobs.finetune import lifecycle
from jobs.finetune.forms import FineTuneForm
from jobs.models import FineTuneRun
from jobs.sessions import limits
from jobs.sessions.forms import form_errors


def create(
    user: User, data: Mapping[str, Any], files: MultiValueDict[str, Any], request_token: str = ""
) -> FineTuneRun:
    """Validate a request (FineTuneForm: where, how, and the data line by line), create the run with its checked
    files and enqueue its submit once the row is committed. A request_token seen before returns that run."""
    if request_token:
        earlier = FineTuneRun.objects.filter(owner=user, request_token=request_token).first()
        if earlier is not None:
            return earlier
    form = FineTuneForm(data, files, user=user)
    if not form.is_valid():
        raise form_errors(form)
    assert form.checked is not None
    checked = form.checked
    try:
        with transaction.atomic():
            run = FineTuneRun(owner=user, request_token=request_token, **form.run_columns)
            # Checked again under a lock on the user, as a launch is (jobs/sessions/launching.py): two starts at
            # once cannot both take the last GPU the user may hold or the last GPU-hours of an allocation.
            User.objects.select_for_update().filter(pk=user.pk).first()
            limits.check(user, run.cluster, run.gpus_per_node)
            allocations.check_launch(user, run.account, run.cluster, run.gpus_per_node, run.walltime_min, lock=True)
            run.train_file.save("train.jsonl", File(checked.train), save=False)
            if checked.valid is not None:
                run.valid_file.save("valid.jsonl", File(checked.valid), save=False)
            run.save()
            split = f", {run.valid_examples} to validate" if run.valid_examples else ""
            further = f", training further {run.parent.model_name}" if run.parent is not None else ""
            run.events.create(
                to_state=run.state,
                reason=f"requested by {user.get_username()}: {run.get_method_display()} of {run.variant} on "
                f"{run.train_examples} examples from {run.name}{split}, {run.planned_steps} steps{further}"[:500],
            )
            transaction.on_commit(lambda: tasks.submit_finetune.delay(str(run.pk)))
    except IntegrityError:
        if not request_token:
            raise
        return FineTuneRun.objects.get(owner=user, request_token=request_token)  # the other submit won the race
    finally:
        checked.close()
    return run


def cancel(run: FineTuneRun) -> None:
    """Ask for the end of a run: at once when nothing was submitted, else through scancel in a task. Its
    checkpoints stay on the cluster."""
    if run.is_ended:
        raise ValidationError(f"The run has already ended ({run.get_state_display()}).")
    if lifecycle.mark_cancel(str(run.pk)):
        transaction.on_commit(lambda: tasks.cancel_finetune.delay(str(run.pk)))
