"""`manage.py sessions launch|list|show|cancel|log|script`: the admin's command line for smoke-testing a cluster.

launch takes the launch form's fields as flags (jobs/sessions/forms.py) and goes through actions.launch() (with
--prompts, jobs/batch/actions.launch()), the same validation and tasks as the web; a Celery worker (and beat, for
polling) must run for a session to move. --json prints a session as the same fields, so its output can be launched
again.
"""

from __future__ import annotations

import json
import time
from argparse import ArgumentParser, _ActionsContainer
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from django import forms
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import UploadedFile
from django.core.management.base import BaseCommand, CommandError
from django.utils.datastructures import MultiValueDict

from jobs.batch import actions as batch_actions
from jobs.batch.forms import BatchForm, Checked
from jobs.cluster import jobscript, logs, measured
from jobs.models import END_STATES, LLMSession, State
from jobs.sessions import actions
from jobs.sessions.access import find_session, with_adapters, with_relations
from jobs.sessions.forms import LaunchForm, form_errors, values_of
from jobs.sessions.lifecycle import job_spec
from portal import ssh
from portal.errors import text_of
from portal.users import find_user

ORDER = [State.PENDING, State.SUBMITTING, State.QUEUED, State.STARTING, State.RUNNING]
# What a session's report adds to its launch fields: where it is in its life.
LIFE = ("state", "job_id", "node_list", "host", "port", "slurm_reason", "estimated_start", "end_reason",
        "created_at", "submitted_at", "started_at", "ready_at", "ended_at")  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_launch_flags(
    parser: _ActionsContainer, form_class: type[forms.Form] = LaunchForm, optional: bool = False
) -> None:
    """One flag per field of the launch form (or another), with the field's type, choices, help and requiredness
    (none with `optional`); a file field takes a path."""
    for name, field in form_class.base_fields.items():
        limits = [getattr(field, "min_value", None), getattr(field, "max_value", None)]
        bounds = f"{limits[0]} to {limits[1]}" if None not in limits else ""
        help_text = "; ".join(str(part) for part in (field.label or "", bounds, field.help_text) if part)
        if isinstance(field, forms.BooleanField):
            parser.add_argument(_flag(name), action="store_true", help=help_text)
            continue
        kwargs: dict[str, Any] = {"required": field.required and not optional, "help": help_text or None}
        if isinstance(field, forms.ChoiceField):
            choices = cast("list[tuple[object, str]]", field.choices)
            kwargs["choices"] = [str(value) for value, _ in choices if value != ""]
        elif isinstance(field, forms.IntegerField):
            kwargs["type"] = int
        elif isinstance(field, forms.FloatField):
            kwargs["type"] = float
        if getattr(field, "repeatable", False):
            kwargs["action"] = "append"  # --adapter A --adapter B, or --adapter A,B
        parser.add_argument(_flag(name), **kwargs)


def describe(session: LLMSession) -> dict[str, Any]:
    """A session as --json prints it: its launch fields (as `launch` takes them), its owner, and its life."""
    life = {name: getattr(session, name) for name in LIFE}
    return {
        "uuid": str(session.pk),
        "owner": session.owner.get_username(),
        **values_of(session, LaunchForm),
        **{name: value.isoformat() if hasattr(value, "isoformat") else value or None for name, value in life.items()},
        "measured": measured.clean(session.measured) or None,  # what its server said (measured.FIELDS)
    }


def checked_prompts(o: dict[str, Any]) -> Checked | None:
    """The prompts file of --prompts and the other BatchForm flags, checked; None without --prompts."""
    if not o["prompts"]:
        return None
    path = Path(o["prompts"])
    try:
        upload = UploadedFile(path.open("rb"), name=path.name, size=path.stat().st_size)
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    with upload:
        data = {name: o[name] for name in BatchForm.base_fields if name != "prompts" and o[name] is not None}
        form = BatchForm(data, MultiValueDict({"prompts": [upload]}))
        if not form.is_valid():
            raise form_errors(form)
    assert form.checked is not None
    return form.checked


class Command(BaseCommand):
    help = "Launch, list, inspect and cancel LLM sessions."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        p = sub.add_parser("launch", help="start a session (same fields and checks as the web wizard)")
        p.add_argument("--user", required=True, help="the portal user who owns the session")
        add_launch_flags(p)
        batch = p.add_argument_group("a batch launch: the job works through a prompts file and ends (docs/batch.md)")
        add_launch_flags(batch, BatchForm, optional=True)  # a batch launch only with --prompts
        p.add_argument(
            "--wait", choices=["queued", "starting", "running", "ended"], help="wait until this state (or an end)"
        )
        p.add_argument("--timeout", type=int, default=900, help="seconds to --wait")
        p.add_argument("--json", action="store_true")
        p = sub.add_parser("list", help="sessions, newest first")
        p.add_argument("--user")
        p.add_argument("--all", action="store_true", help="include ended sessions")
        p.add_argument("--json", action="store_true")
        p = sub.add_parser("show", help="one session")
        p.add_argument("uuid")
        p.add_argument("--json", action="store_true")
        p = sub.add_parser("cancel", help="cancel a session (scancel)")
        p.add_argument("uuid")
        p.add_argument("--wait", action="store_true", help="wait until Slurm confirms the end")
        p.add_argument("--timeout", type=int, default=300)
        p.add_argument("--json", action="store_true")
        p = sub.add_parser("log", help="the tail of the job's output")
        p.add_argument("uuid")
        p = sub.add_parser("script", help="print the job script the session is (or would be) submitted with")
        p.add_argument("uuid")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"_{options['action']}")(options)
        except ValidationError as exc:
            raise CommandError(text_of(exc)) from None

    def _launch(self, o: dict[str, Any]) -> None:
        user = find_user(o["user"])
        data = {name: o[name] for name in LaunchForm.base_fields if o[name] is not None}
        checked = checked_prompts(o)
        session = batch_actions.launch(user, data, batch=checked) if checked is not None else actions.launch(user, data)
        if not o["json"]:
            self.stdout.write(f"session {session.pk} created; submitting")
        if o["wait"]:
            wanted = len(ORDER) if o["wait"] == "ended" else ORDER.index(State(o["wait"]))
            session = self._wait(
                session,
                lambda s: s.is_ended or (s.state in ORDER and ORDER.index(State(s.state)) >= wanted),
                o["timeout"],
            )
        self._print(session, o["json"])
        self._exit_for(session)

    def _wait(self, session: LLMSession, done: Callable[[LLMSession], bool], timeout_s: int) -> LLMSession:
        deadline = time.monotonic() + timeout_s
        while True:
            session.refresh_from_db()
            if done(session):
                return session
            if time.monotonic() > deadline:
                self._print(session, False)
                raise CommandError(f"gave up waiting after {timeout_s}s; the session is {session.state}")
            time.sleep(0.25)  # the watch shows Running within a second of the health check: do not add another

    def _list(self, o: dict[str, Any]) -> None:
        sessions = with_adapters(with_relations())
        if o["user"]:
            sessions = sessions.filter(owner=find_user(o["user"]))
        if not o["all"]:
            sessions = sessions.exclude(state__in=END_STATES)
        rows = [describe(s) for s in sessions[:500]]
        if o["json"]:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        for r in rows:
            self.stdout.write(
                f"{r['uuid']}  {r['state']:<10} {r['owner']:<12} {r['cluster']}/{r['partition']} "
                f"{r['model']} {r['quant']} ({r['runtime']}) job {r['job_id'] or '-'} {r['node_list'] or ''}"
            )

    def _show(self, o: dict[str, Any]) -> None:
        self._print(find_session(o["uuid"]), o["json"], events=True)

    def _cancel(self, o: dict[str, Any]) -> None:
        session = find_session(o["uuid"])
        if session.is_ended:
            raise CommandError(f"session {session.pk} has already ended ({session.state})")
        actions.request_cancel(session, "cancelled from the command line")
        if o["wait"]:
            session = self._wait(session, lambda s: s.is_ended, o["timeout"])
        else:
            session.refresh_from_db()
        self._print(session, o["json"])

    def _log(self, o: dict[str, Any]) -> None:
        try:
            self.stdout.write(logs.fetch(find_session(o["uuid"])))
        except ssh.SSHError as exc:
            raise CommandError(str(exc)) from None

    def _script(self, o: dict[str, Any]) -> None:
        self.stdout.write(jobscript.render(job_spec(find_session(o["uuid"]))))

    def _print(self, session: LLMSession, as_json: bool, events: bool = False) -> None:
        data = describe(session)
        if events:
            data["events"] = [
                {"at": e.at.isoformat(), "from": e.from_state, "to": e.to_state, "cause": e.cause}
                for e in session.events.all()
            ]
        if as_json:
            self.stdout.write(json.dumps(data, indent=2))
            return
        for key, value in data.items():
            if key == "events":
                for e in value:
                    self.stdout.write(f"  {e['at']}  {e['from'] or '-'} -> {e['to']}: {e['cause']}")
            elif value is not None and value != "":
                self.stdout.write(f"{key:>16}: {value}")

    def _exit_for(self, session: LLMSession) -> None:
        if session.state in {State.FAILED, State.TIMEOUT}:
            raise CommandError(f"session {session.pk} {session.state}: {session.end_reason}")
