"""`manage.py batch run|list|show|output|stop`: batch runs from the command line (docs/batch.md).

A batch launch is `manage.py sessions launch ... --prompts FILE`; `batch run SESSION --prompts FILE` runs a file on a
running session. Both go through the same checks and actions as the pages, so a worker (and beat) must run.
"""

from __future__ import annotations

import json
from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from jobs.batch import actions, outputs, staging
from jobs.batch.forms import BatchForm
from jobs.management.commands.sessions import add_launch_flags, checked_prompts
from jobs.models import BatchRun
from jobs.sessions.access import find_session
from portal import ssh
from portal.errors import text_of
from portal.users import find_user

SHOWN = ("name", "state", "prompts", "done", "failed", "remaining", "prompt_tokens", "completion_tokens",
         "tokens_per_s", "concurrency", "replicas", "input_format", "endpoint", "ends_session", "end_reason",
         "created_at", "started_at", "finished_at")  # fmt: skip


def describe(run: BatchRun) -> dict[str, Any]:
    data: dict[str, Any] = {"uuid": str(run.pk), "owner": run.owner.get_username(), "session": str(run.session_id)}
    for name in SHOWN:
        value = getattr(run, name)
        data[name] = value.isoformat() if hasattr(value, "isoformat") else value
    data["gpu_hours"] = round(run.gpu_hours, 3)
    data["eta_s"] = None if run.eta_s is None else round(run.eta_s)
    return data


def find_run(text: str) -> BatchRun:
    text = text.strip().lower()
    matches = list(BatchRun.objects.select_related("session", "owner").filter(id__startswith=text)[:2])
    if len(text) < 4 or len(matches) != 1:
        raise CommandError(f"No single batch run matches {text!r}.")
    return matches[0]


class Command(BaseCommand):
    help = "Batch runs: run a prompts file on a running session, list, show, download, stop."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        p = sub.add_parser("run", help="run a prompts file on a running session (it stays up)")
        p.add_argument("session", help="the session's uuid or a unique prefix")
        add_launch_flags(p, BatchForm)
        p.add_argument("--json", action="store_true")
        p = sub.add_parser("list", help="batch runs, newest first")
        p.add_argument("--user")
        p.add_argument("--json", action="store_true")
        p = sub.add_parser("show", help="one run: progress, tokens, GPU-hours, its history")
        p.add_argument("uuid")
        p.add_argument("--json", action="store_true")
        p = sub.add_parser("output", help="the results to standard output, streamed from the cluster")
        p.add_argument("uuid")
        p.add_argument("--format", choices=outputs.FORMATS, default="jsonl")
        p = sub.add_parser("stop", help="stop a run; what it answered is kept")
        p.add_argument("uuid")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"_{options['action']}")(options)
        except ValidationError as exc:
            raise CommandError(text_of(exc)) from None

    def _run(self, o: dict[str, Any]) -> None:
        checked = checked_prompts(o)
        if checked is None:
            raise CommandError("name the prompts file with --prompts FILE")
        run = actions.start_run(find_session(o["session"]), checked)
        self._print(run, o["json"])

    def _list(self, o: dict[str, Any]) -> None:
        runs = BatchRun.objects.select_related("session", "owner")
        if o["user"]:
            runs = runs.filter(owner=find_user(o["user"]))
        rows = [describe(r) for r in runs[:500]]
        if o["json"]:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        for r in rows:
            self.stdout.write(f"{r['uuid']}  {r['state']:<9} {r['owner']:<12} {r['done']}/{r['prompts']} "
                              f"({r['failed']} failed) {r['name']}")  # fmt: skip

    def _show(self, o: dict[str, Any]) -> None:
        self._print(find_run(o["uuid"]), o["json"], events=True)

    def _output(self, o: dict[str, Any]) -> None:
        run = find_run(o["uuid"])
        try:
            _, records = staging.results(run)
            for chunk in outputs.convert(records, o["format"], str(run.pk)):
                self.stdout.write(chunk.decode(), ending="")
        except staging.NoResults as exc:
            raise CommandError(str(exc)) from None
        except ssh.SSHError as exc:
            raise CommandError(f"cannot read the results: {exc}") from None
        self.stdout.flush()

    def _stop(self, o: dict[str, Any]) -> None:
        run = find_run(o["uuid"])
        actions.stop_run(run)
        self.stdout.write(f"stopping batch run {run.pk}; what it answered is kept")

    def _print(self, run: BatchRun, as_json: bool, events: bool = False) -> None:
        data = describe(run)
        if events:
            data["events"] = [
                {"at": e.at.isoformat(), "from": e.from_state, "to": e.to_state, "reason": e.reason}
                for e in run.events.all()
            ]
        if as_json:
            self.stdout.write(json.dumps(data, indent=2))
            return
        for key, value in data.items():
            if key == "events":
                for e in value:
                    self.stdout.write(f"  {e['at']}  {e['from'] or '-'} -> {e['to']}: {e['reason']}")
            elif value is not None and value != "":
                self.stdout.write(f"{key:>18}: {value}")
