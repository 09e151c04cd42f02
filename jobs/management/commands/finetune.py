"""`manage.py finetune create|list|show|cancel`: fine-tune runs from the command line (docs/finetune.md).

create takes the fine-tune form's fields as flags (jobs/finetune/forms.py: the launch's where-fields, the method and
hyperparameters, the data files as paths) and goes through actions.create(), the same checks and tasks as the page; a
Celery worker (and beat, for polling) must run for a run to move. --json prints a run with its record and history.
"""

from __future__ import annotations

import contextlib
import json
import time
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import UploadedFile
from django.core.management.base import BaseCommand, CommandError
from django.utils.datastructures import MultiValueDict

from jobs.finetune import actions
from jobs.finetune.forms import FineTuneForm
from jobs.management.commands.sessions import add_launch_flags
from jobs.models import FineTuneRun
from portal.errors import text_of
from portal.users import find_user

# What a run's report shows beyond its settings: where it is in its life and what its trainer reported.
REPORT = ("state", "job_id", "node_list", "slurm_reason", "end_reason", "step", "planned_steps", "epoch", "train_loss",
          "valid_loss", "tokens_per_s", "peak_memory_gib", "estimate_gib", "restarts", "resumed_from_step", "precision",
          "train_examples", "valid_examples", "dataset_sha256", "created_at", "submitted_at", "started_at",
          "finished_at")  # fmt: skip
SETTINGS = ("method", "epochs", "learning_rate", "lora_rank", "lora_alpha", "lora_dropout", "target_modules",
            "max_seq_length", "batch_size", "gradient_accumulation", "gradient_checkpointing", "checkpoint_every",
            "seed", "suffix", "data_format", "name")  # fmt: skip


def describe(run: FineTuneRun, events: bool = False) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        return value.isoformat() if hasattr(value, "isoformat") else value

    out = {
        "uuid": str(run.pk),
        "model": run.model_name,
        "owner": run.owner.get_username(),
        "base": f"{run.variant.model.name}:{run.variant.quantization}",
        "where": f"{run.cluster.slug}/{run.partition.name} {run.gpus_per_node} x {run.gpu_type.name}",
        **{name: getattr(run, name) for name in SETTINGS},
        **{name: plain(getattr(run, name)) for name in REPORT},
        "gpu_hours": round(run.gpu_hours, 4),
        "result": run.result or None,
    }
    if events:
        out["events"] = [
            {"at": e.at.isoformat(), "from": e.from_state, "to": e.to_state, "reason": e.reason}
            for e in run.events.all()
        ]
    return out


def find_run(text: str) -> FineTuneRun:
    try:
        return FineTuneRun.objects.select_related("owner", "variant__model", "cluster", "partition", "gpu_type").get(
            pk=text
        )
    except (FineTuneRun.DoesNotExist, ValidationError, ValueError):
        raise CommandError(f"no fine-tune run {text!r}") from None


class Command(BaseCommand):
    help = "Create, list, show and cancel fine-tune runs."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        p = sub.add_parser("create", help="check the data and start a run")
        p.add_argument("--user", required=True, help="the portal user who owns the run")
        add_launch_flags(p, FineTuneForm)
        p.add_argument("--wait", action="store_true", help="wait until the run has ended")
        p.add_argument("--timeout", type=int, default=3600, help="seconds to --wait")
        p.add_argument("--json", action="store_true")
        p = sub.add_parser("list")
        p.add_argument("--user")
        p.add_argument("--all", action="store_true", help="include ended runs")
        p.add_argument("--json", action="store_true")
        p = sub.add_parser("show")
        p.add_argument("uuid")
        p.add_argument("--json", action="store_true")
        p = sub.add_parser("cancel")
        p.add_argument("uuid")
        p.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"_{options['action']}")(options)
        except ValidationError as exc:
            raise CommandError(text_of(exc)) from None

    def _create(self, o: dict[str, Any]) -> None:
        user = find_user(o["user"])
        names = FineTuneForm.base_fields
        data = {n: o[n] for n, f in names.items() if not isinstance(f, forms.FileField) and o[n] is not None}
        with contextlib.ExitStack() as stack:
            files: MultiValueDict[str, Any] = MultiValueDict()
            for name, field in names.items():
                if isinstance(field, forms.FileField) and o[name]:
                    path = Path(o[name])
                    try:
                        upload = UploadedFile(path.open("rb"), name=path.name, size=path.stat().st_size)
                    except OSError as exc:
                        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
                    files[name] = stack.enter_context(upload)
            run = actions.create(user, data, files)
        if not o["json"]:
            self.stdout.write(f"fine-tune run {run.pk} created ({run.planned_steps} steps); submitting")
        if o["wait"]:
            deadline = time.monotonic() + o["timeout"]
            while not run.is_ended:
                if time.monotonic() > deadline:
                    raise CommandError(f"gave up waiting after {o['timeout']}s; the run is {run.state}")
                time.sleep(1)
                run.refresh_from_db()
        self._print(run, o["json"])
        if run.state in (FineTuneRun.State.FAILED, FineTuneRun.State.CANCELLED):
            raise CommandError(f"the run {run.state}: {run.end_reason}")

    def _list(self, o: dict[str, Any]) -> None:
        runs = FineTuneRun.objects.select_related("owner", "variant__model", "cluster", "partition", "gpu_type")
        if o["user"]:
            runs = runs.filter(owner=find_user(o["user"]))
        if not o["all"]:
            runs = runs.exclude(state__in=FineTuneRun.END_STATES)
        rows = [describe(r) for r in runs[:500]]
        if o["json"]:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        for r in rows:
            self.stdout.write(
                f"{r['uuid']}  {r['state']:<9} {r['owner']:<12} {r['model']} {r['method']} step {r['step']} of "
                f"{r['planned_steps']} job {r['job_id'] or '-'}"
            )

    def _show(self, o: dict[str, Any]) -> None:
        self._print(find_run(o["uuid"]), o["json"], events=True)

    def _cancel(self, o: dict[str, Any]) -> None:
        run = find_run(o["uuid"])
        actions.cancel(run)
        run.refresh_from_db()
        self._print(run, o["json"])

    def _print(self, run: FineTuneRun, as_json: bool, events: bool = False) -> None:
        report = describe(run, events)
        if as_json:
            self.stdout.write(json.dumps(report, indent=2))
            return
        for key, value in report.items():
            if key == "events":
                for e in value:
                    self.stdout.write(f"  {e['at']}  {e['from'] or '-'} -> {e['to']}: {e['reason']}")
            elif value not in (None, "", {}):
                self.stdout.write(f"{key}: {value}")
