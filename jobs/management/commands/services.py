"""`manage.py services create|list|show|scale|stop`: model services from the command line (jobs/services/).

create takes the launch form's fields as flags, as `sessions launch` does (the same LaunchForm checks the launch its
replicas are made from); a Celery worker and beat keep the replicas up. --json prints a service with its replicas.
"""

from __future__ import annotations

import json
import time
from argparse import ArgumentParser, ArgumentTypeError
from typing import Any

from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from jobs.management.commands.sessions import add_launch_flags
from jobs.models import END_STATES, ModelService
from jobs.services import actions
from jobs.services.overview import describe
from jobs.sessions.forms import LaunchForm
from portal.errors import text_of
from portal.users import find_user


def inflight_cap(value: str) -> int | None:
    """--max-inflight-per-user: a number (0: no cap), or "site" for the site's default."""
    if value == "site":
        return None
    try:
        return int(value)
    except ValueError:
        raise ArgumentTypeError(f"{value!r} is neither a number nor 'site'") from None


INFLIGHT_HELP = "requests one user may have in flight on it at once (0: no cap; 'site': the site's default)"


def find_service(name: str) -> ModelService:
    service = ModelService.objects.filter(name=name).select_related("owner").first()
    if service is None:
        raise CommandError(f"no service is named {name!r}")
    return service


class Command(BaseCommand):
    help = "Create, list, inspect, scale and stop model services (a name kept up by replicas)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        p = sub.add_parser("create", help="a new service, its replicas launched with these launch fields")
        p.add_argument("name")
        p.add_argument("--user", required=True, help="the portal user who owns it (and its replicas)")
        add_launch_flags(p)
        p.add_argument("--min", type=int, default=1, help="replicas kept up (default 1)")
        p.add_argument("--max", type=int, help="replicas at most (default: --min, or 1 when --min is 0)")
        p.add_argument(
            "--target-inflight", type=int, help="requests in flight per replica above which it scales up (default 4)"
        )
        p.add_argument(
            "--idle-minutes",
            type=float,
            help="how long one replica fewer must have been enough before one is removed (default 15)",
        )
        p.add_argument("--max-inflight-per-user", type=inflight_cap, help=INFLIGHT_HELP + " (default: 'site')")
        who = p.add_mutually_exclusive_group()
        who.add_argument("--group", action="append", default=[], help="members of this group may use it (repeat)")
        who.add_argument("--site", action="store_true", help="everyone signed in may use it (needs the permission)")
        p.add_argument("--json", action="store_true")
        p = sub.add_parser("list", help="the services")
        p.add_argument("--json", action="store_true")
        p = sub.add_parser("show", help="one service and its replicas")
        p.add_argument("name")
        p.add_argument("--json", action="store_true")
        p = sub.add_parser("scale", help="change how many replicas it keeps")
        p.add_argument("name")
        p.add_argument("--min", type=int, required=True)
        p.add_argument("--max", type=int, required=True)
        p.add_argument("--target-inflight", type=int)
        p.add_argument("--idle-minutes", type=float)
        p.add_argument("--max-inflight-per-user", type=inflight_cap, default=..., help=INFLIGHT_HELP)
        p = sub.add_parser("stop", help="keep no replica up any more; cancel the live ones")
        p.add_argument("name")
        p.add_argument("--wait", action="store_true", help="until every replica has ended")
        p.add_argument("--timeout", type=int, default=300)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"_{options['action']}")(options)
        except ValidationError as exc:
            raise CommandError(text_of(exc)) from None

    def _create(self, o: dict[str, Any]) -> None:
        owner = find_user(o["user"])
        launch = {name: o[name] for name in LaunchForm.base_fields if o[name] is not None}
        groups = []
        for name in o["group"]:
            group = Group.objects.filter(name=name).first()
            if group is None:
                raise CommandError(f"no group is named {name!r}")
            groups.append(group)
        audience = "site" if o["site"] else "groups" if groups else "owner"
        service = actions.create(owner, o["name"], launch, min_replicas=o["min"], max_replicas=o["max"],
                                 audience=audience, groups=groups, target_inflight=o["target_inflight"],
                                 idle_minutes=o["idle_minutes"],
                                 max_inflight_per_user=o["max_inflight_per_user"])  # fmt: skip
        self._print(service, o["json"])

    def _list(self, o: dict[str, Any]) -> None:
        rows = [describe(s) for s in ModelService.objects.select_related("owner")]
        if o["json"]:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        for r in rows:
            ready = sum(1 for x in r["replicas"] if x["state"] == "running")
            self.stdout.write(f"{r['name']:<24} {r['owner']:<12} {r['audience']:<6} {ready}/{r['min']}-{r['max']} "
                              f"ready{'' if r['running'] else '  (stopped)'}")  # fmt: skip

    def _show(self, o: dict[str, Any]) -> None:
        self._print(find_service(o["name"]), o["json"])

    def _scale(self, o: dict[str, Any]) -> None:
        service = find_service(o["name"])
        actions.scale(service, o["min"], o["max"], target_inflight=o["target_inflight"],
                      idle_minutes=o["idle_minutes"], max_inflight_per_user=o["max_inflight_per_user"])  # fmt: skip
        self._print(service, False)

    def _stop(self, o: dict[str, Any]) -> None:
        service = find_service(o["name"])
        count = actions.stop(service, "its service was stopped from the command line")
        self.stdout.write(f"service {service.name} stopped; {count} replica(s) cancelled")
        deadline = time.monotonic() + o["timeout"]
        while o["wait"] and service.replicas.exclude(state__in=END_STATES).exists():
            if time.monotonic() > deadline:
                raise CommandError(f"gave up waiting after {o['timeout']}s")
            time.sleep(0.5)

    def _print(self, service: ModelService, as_json: bool) -> None:
        row = describe(service)
        if as_json:
            self.stdout.write(json.dumps(row, indent=2))
            return
        self.stdout.write(f"service {row['name']} ({row['audience']}; {row['min']} to {row['max']} replicas)")
        for r in row["replicas"]:
            self.stdout.write(f"  {r['uuid']}  {r['state']:<10} job {r['job_id'] or '-'} {r['node_list'] or ''}")
