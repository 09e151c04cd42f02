"""`manage.py sessions launch|list|show|cancel|log|script`: the admin's command line for smoke-testing a cluster.

launch goes through services.launch(), the same validation and tasks as the web; a Celery worker (and beat, for
polling) must run for a session to move.
"""

from __future__ import annotations

import json
import time
from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from jobs import render, ssh
from jobs.models import END_STATES, Session, State
from jobs.services import describe, find_session, find_user, form_errors_text, job_spec, launch, request_cancel
from jobs.tasks import fetch_log

ORDER = [State.PENDING, State.SUBMITTING, State.QUEUED, State.STARTING, State.RUNNING]


class Command(BaseCommand):
    help = "Launch, list, inspect and cancel LLM sessions."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        p = sub.add_parser("launch", help="start a session (same path as the web wizard)")
        p.add_argument("--user", required=True)
        p.add_argument("--cluster", required=True)
        p.add_argument("--partition", required=True)
        p.add_argument("--gpu", required=True)
        p.add_argument("--gpus", type=int, required=True)
        p.add_argument("--nodes", type=int, default=1)
        p.add_argument("--model", required=True)
        p.add_argument("--quant", required=True)
        p.add_argument("--runtime", required=True, choices=["llama.cpp", "ollama", "vllm"])
        p.add_argument("--context", type=int, required=True)
        p.add_argument("--parallel", type=int)
        p.add_argument("--cpus", type=int)
        p.add_argument("--memory-gib", type=int)
        p.add_argument("--walltime", type=int, required=True, help="minutes")
        p.add_argument("--wait", choices=["queued", "starting", "running"], help="wait until this state (or an end)")
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
            raise CommandError(form_errors_text(exc)) from None

    def _launch(self, o: dict[str, Any]) -> None:
        user = find_user(o["user"])
        data = {
            "cluster": o["cluster"],
            "partition": o["partition"],
            "gpu": o["gpu"],
            "gpus": o["gpus"],
            "nodes": o["nodes"],
            "model": o["model"],
            "quant": o["quant"],
            "runtime": o["runtime"],
            "context": o["context"],
            "parallel": o["parallel"],
            "walltime": o["walltime"],
            "cpus": o["cpus"],
            "memory_gib": o["memory_gib"],
        }
        session = launch(user, {k: v for k, v in data.items() if v is not None})
        if not o["json"]:
            self.stdout.write(f"session {session.pk} created; submitting")
        if o["wait"]:
            session = self._wait(
                session,
                lambda s: (
                    s.is_ended or ORDER.index(State(s.state)) >= ORDER.index(State(o["wait"]))
                    if s.state in ORDER
                    else s.is_ended
                ),
                o["timeout"],
            )
        self._print(session, o["json"])
        self._exit_for(session)

    def _wait(self, session: Session, done: Any, timeout_s: int) -> Session:
        deadline = time.monotonic() + timeout_s
        while True:
            session.refresh_from_db()
            if done(session):
                return session
            if time.monotonic() > deadline:
                self._print(session, False)
                raise CommandError(f"gave up waiting after {timeout_s}s; the session is {session.state}")
            time.sleep(1)

    def _list(self, o: dict[str, Any]) -> None:
        sessions = Session.objects.select_related(
            "owner", "cluster", "partition", "gpu_type", "variant__model", "runtime"
        )
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
                f"{r['model']} {r['quant']} ({r['runtime']}) job {r['job_id'] or '-'} {r['node'] or ''}"
            )

    def _show(self, o: dict[str, Any]) -> None:
        session = find_session(o["uuid"])
        self._print(session, o["json"], events=True)

    def _cancel(self, o: dict[str, Any]) -> None:
        session = find_session(o["uuid"])
        if session.is_ended:
            raise CommandError(f"session {session.pk} has already ended ({session.state})")
        request_cancel(session, "cancelled from the command line")
        if o["wait"]:
            session = self._wait(session, lambda s: s.is_ended, o["timeout"])
        else:
            session.refresh_from_db()
        self._print(session, o["json"])

    def _log(self, o: dict[str, Any]) -> None:
        session = find_session(o["uuid"])
        try:
            self.stdout.write(fetch_log(session))
        except ssh.SSHError as exc:
            raise CommandError(str(exc)) from None

    def _script(self, o: dict[str, Any]) -> None:
        self.stdout.write(render.render(job_spec(find_session(o["uuid"]))))

    def _print(self, session: Session, as_json: bool, events: bool = False) -> None:
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
            elif value is not None:
                self.stdout.write(f"{key:>16}: {value}")

    def _exit_for(self, session: Session) -> None:
        if session.state in {State.FAILED, State.TIMEOUT}:
            raise CommandError(f"session {session.pk} {session.state}: {session.end_reason}")
