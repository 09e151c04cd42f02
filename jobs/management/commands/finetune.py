"""`manage.py finetune create|list|show|cancel|share|unshare|compare|comparison`: fine-tune runs from the command line
(docs/finetune.md).

create takes the fine-tune form's fields as flags (jobs/finetune/forms.py: the launch's where-fields, the method and
hyperparameters, the data files as paths, --from the run whose adapter it trains further) and goes through
actions.create(), the same checks and tasks as the page; a
Celery worker (and beat, for polling) must run for a run to move. --json prints a run with its record and history.
share and unshare grant and revoke a completed run's adapter for users or a group on its owner's behalf, through the
page's form (jobs/finetune/sharing.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from argparse import ArgumentParser
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from django import forms
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import UploadedFile
from django.core.management.base import BaseCommand, CommandError
from django.utils.datastructures import MultiValueDict

from jobs.finetune import actions, comparisons, sharing
from jobs.finetune.forms import FineTuneForm
from jobs.finetune.sharing import AdapterShareForm
from jobs.management.commands.sessions import add_launch_flags
from jobs.models import FineTuneComparison, FineTuneRun
from jobs.sessions.forms import form_errors
from portal.errors import text_of
from portal.users import find_user

# What a run's report shows beyond its settings: where it is in its life and what its trainer reported.
REPORT = ("state", "job_id", "node_list", "slurm_reason", "end_reason", "step", "planned_steps", "epoch", "train_loss",
          "valid_loss", "base_valid_loss", "tokens_per_s", "peak_memory_gib", "estimate_gib", "restarts",
          "resumed_from_step", "precision", "train_examples", "valid_examples", "dataset_sha256", "created_at",
          "submitted_at", "started_at", "finished_at")  # fmt: skip
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
        # The run whose adapter this one trained further (docs/finetune.md); None for a new adapter.
        "parent": str(run.parent_id) if run.parent_id else None,
        "parent_model": run.parent.model_name if run.parent is not None else None,
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


def _group(name: str | None) -> int | None:
    if not name:
        return None
    group = Group.objects.filter(name=name).first()
    if group is None:
        raise CommandError(f"there is no group {name!r}")
    return group.pk


class AskedFlags(forms.Form):
    """The compare form's fields that are flags as they are (the prompts file, its format, the sampling); the
    source (--validation) and the session (--session, default the newest) are flags of their own."""


AskedFlags.base_fields = {name: comparisons.CompareForm.base_fields[name] for name in comparisons.ASKED}


def describe_comparison(comparison: FineTuneComparison, page: int | None = None) -> dict[str, Any]:
    """A comparison as --json prints it: what it compared, its two batch runs, and a page of answers side by side."""
    run = comparison.run
    out: dict[str, Any] = {
        "uuid": str(comparison.pk),
        "run": str(run.pk),
        "base": run.variant.model.name,
        "adapter": run.model_name,
        "source": comparison.source,
        "name": comparison.name,
        "prompts": comparison.prompts,
        "state": comparison.state,
        "reason": comparison.reason,
        "session": str(comparison.batches[0].session_id if comparison.batches else comparison.launched_session_id),
        "launched_session": str(comparison.launched_session_id) if comparison.launched_session_id else None,
        "valid_loss": {"base": run.base_valid_loss, "adapter": run.valid_loss},
        "batches": {
            who: {"uuid": str(b.pk), "state": b.state, "done": b.done, "failed": b.failed}
            for who, b in zip(("base", "adapter"), comparison.batches, strict=False)
        },
    }
    if page is not None:
        shown = comparisons.rows(comparison, page)
        out["page"], out["pages"], out["problems"] = shown.number, shown.pages, shown.problems
        out["rows"] = [
            {
                "line": row.line,
                "prompt": row.prompt,
                "reference": row.reference,
                "base": None if row.base is None else dataclasses.asdict(row.base),
                "adapter": None if row.adapter is None else dataclasses.asdict(row.adapter),
            }
            for row in shown.rows
        ]
    return out


def find_run(text: str) -> FineTuneRun:
    try:
        return FineTuneRun.objects.select_related(
            "owner", "variant__model", "cluster", "partition", "gpu_type", "parent__variant__model", "parent__owner"
        ).get(pk=text)
    except (FineTuneRun.DoesNotExist, ValidationError, ValueError):
        raise CommandError(f"no fine-tune run {text!r}") from None


Ended = TypeVar("Ended", FineTuneRun, FineTuneComparison)


def ended(read: Callable[[], Ended], timeout_s: int, what: str) -> Ended:
    """--wait: what read() gives, once a second, until it has ended; past timeout_s, an error with its state."""
    deadline = time.monotonic() + timeout_s
    while not (found := read()).is_ended:
        if time.monotonic() > deadline:
            raise CommandError(f"gave up waiting after {timeout_s}s; the {what} is {found.state}")
        time.sleep(1)
    return found


class Command(BaseCommand):
    help = "Create, list, show, cancel and share fine-tune runs."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        p = sub.add_parser("create", help="check the data and start a run")
        p.add_argument("--user", required=True, help="the portal user who owns the run")
        # Optional flags, checked by the form: with --from (a run's uuid or model name) the model and where it runs
        # are the parent's unless given.
        add_launch_flags(p, FineTuneForm, optional=True)
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
        days = AdapterShareForm.base_fields["days"]
        for action, what in (("share", "share the adapter with"), ("unshare", "stop sharing the adapter with")):
            p = sub.add_parser(action, help=f"{what} users or a group, for the run's owner")
            p.add_argument("uuid")
            p.add_argument("--user", action="append", default=[], help="a portal user (again for more)")
            p.add_argument("--group", help="a portal group, by name")
            if action == "share":
                p.add_argument("--days", type=int, help=f"{days.label}; {days.help_text}")
            else:
                p.add_argument("--all", action="store_true", help="every grant in force")
        p = sub.add_parser("compare", help="the same prompts through the base and the adapter, side by side")
        p.add_argument("uuid", help="the fine-tune run")
        add_launch_flags(p, AskedFlags, optional=True)
        p.add_argument("--validation", action="store_true", help="the run's validation data as the prompts")
        where = p.add_mutually_exclusive_group()
        where.add_argument("--session", help="the running session that loaded the adapter (default: the newest)")
        where.add_argument(
            "--launch", action="store_true", help="launch a session for the comparison, ended when both runs have"
        )
        p.add_argument("--wait", action="store_true", help="wait until both batch runs have ended")
        p.add_argument("--timeout", type=int, default=3600, help="seconds to --wait")
        p.add_argument("--page", type=int, default=1, help=f"the answers shown, {comparisons.PAGE_SIZE} a page")
        p.add_argument("--json", action="store_true")
        p = sub.add_parser("comparison", help="show a comparison's answers side by side")
        p.add_argument("uuid", help="the comparison")
        p.add_argument("--page", type=int, default=1)
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
            run = ended(lambda: FineTuneRun.objects.get(pk=run.pk), o["timeout"], "run")
        self._print(run, o["json"])
        if run.state in (FineTuneRun.State.FAILED, FineTuneRun.State.CANCELLED):
            raise CommandError(f"the run {run.state}: {run.end_reason}")

    def _list(self, o: dict[str, Any]) -> None:
        runs = FineTuneRun.objects.select_related(
            "owner", "variant__model", "cluster", "partition", "gpu_type", "parent__variant__model", "parent__owner"
        )
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

    def _share(self, o: dict[str, Any]) -> None:
        run = find_run(o["uuid"])
        data = {"users": " ".join(o["user"]), "group": _group(o["group"]), "days": o["days"]}
        form = AdapterShareForm(run.owner, {k: v for k, v in data.items() if v not in (None, "")})
        if not form.is_valid():
            raise form_errors(form)
        sharing.share(run, run.owner, form.cleaned_data)
        self._grants(run)

    def _unshare(self, o: dict[str, Any]) -> None:
        run = find_run(o["uuid"])
        if not (o["user"] or o["group"] or o["all"]):
            raise CommandError("name --user or --group, or --all")
        in_force, _ = sharing.grants_of(run)
        named = set(o["user"])
        for grant in in_force:
            user_named = grant.user is not None and grant.user.get_username() in named
            if o["all"] or user_named or (grant.group is not None and grant.group.name == o["group"]):
                sharing.revoke(run, grant.pk)
        self._grants(run)

    def _grants(self, run: FineTuneRun) -> None:
        in_force, _ = sharing.grants_of(run)
        for grant in in_force:
            until = grant.expires_at.isoformat() if grant.expires_at else "until revoked"
            self.stdout.write(f"shared with {grant.grantee} ({until})")
        if not in_force:
            self.stdout.write(f"{run.model_name} is not shared")

    def _compare(self, o: dict[str, Any]) -> None:
        run = find_run(o["uuid"])
        sessions = comparisons.sessions_for(run)
        session = sessions.filter(pk=o["session"]).first() if o["session"] else sessions.first()
        data = {name: o[name] for name in comparisons.ASKED if name != "prompts" and o[name] is not None}
        data["source"] = FineTuneComparison.Source.VALIDATION if o["validation"] else FineTuneComparison.Source.PROMPTS
        data["session"] = comparisons.LAUNCH if o["launch"] else str(session.pk) if session else ""
        with contextlib.ExitStack() as stack:
            files: MultiValueDict[str, Any] = MultiValueDict()
            if o["prompts"] and not o["validation"]:
                path = Path(o["prompts"])
                try:
                    upload = UploadedFile(path.open("rb"), name=path.name, size=path.stat().st_size)
                except OSError as exc:
                    raise CommandError(f"cannot read {path}: {exc.strerror}") from None
                files["prompts"] = stack.enter_context(upload)
            comparison = comparisons.start(run.owner, run, data, files)
        if not o["json"]:
            how = "waiting for the session it launched" if comparison.launched_session_id else "two batch runs"
            self.stdout.write(f"comparison {comparison.pk} created: {comparison.prompts} prompts, {how}")
        if o["wait"]:
            comparison = ended(lambda: comparisons.of_run(run).get(pk=comparison.pk), o["timeout"], "comparison")
        self._print_comparison(comparison, o["json"], o["page"] if o["wait"] else None)

    def _comparison(self, o: dict[str, Any]) -> None:
        try:
            comparison = FineTuneComparison.objects.select_related(
                "run__variant__model", "run__owner", "base_batch__session__cluster", "adapter_batch__session__cluster"
            ).get(pk=o["uuid"])
        except (FineTuneComparison.DoesNotExist, ValidationError, ValueError):
            raise CommandError(f"no comparison {o['uuid']!r}") from None
        self._print_comparison(comparison, o["json"], o["page"])

    def _print_comparison(self, comparison: FineTuneComparison, as_json: bool, page: int | None) -> None:
        report = describe_comparison(comparison, page)
        if as_json:
            self.stdout.write(json.dumps(report, indent=2))
            return
        loss = report["valid_loss"]
        what = f"{report['prompts']} prompts ({report['name']})"
        self.stdout.write(f"{report['adapter']} against {report['base']}: {what}")
        self.stdout.write(f"validation loss: base {loss['base']}, adapter {loss['adapter']}")
        if not report["batches"]:
            self.stdout.write(f"{comparison.get_state_display()} {report['reason']}".strip())
        for who, b in report["batches"].items():
            self.stdout.write(f"{who}: batch run {b['uuid']} {b['state']}, {b['done']} answered, {b['failed']} failed")
        for problem in report.get("problems", []):
            self.stdout.write(problem)
        for row in report.get("rows", []):
            self.stdout.write(f"--- line {row['line']}: {row['prompt']}")
            if row["reference"] is not None:
                self.stdout.write(f"  reference: {row['reference']}")
            for who in ("base", "adapter"):
                answer = row[who]
                text = "(not answered yet)" if answer is None else answer["error"] or answer["text"]
                self.stdout.write(f"  {who}: {text}")
        if "pages" in report:
            self.stdout.write(f"page {report['page']} of {report['pages']}")

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
