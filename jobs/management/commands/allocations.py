"""`manage.py allocations set (--user U | --group G | --slurm-account A) [--cluster C] [--gpu-hours H] [--tokens T]
--period day|week|month|term [--from DATE --to DATE] [--soft PERCENT] [--action refuse|warn] [--manager U ...]`;
`allocations list [--json]`, `show ID [--json]`, `clear ID`.

`set` replaces the allocation of the same holder on the same cluster (or everywhere) if there is one."""

from __future__ import annotations

import json
from argparse import ArgumentParser
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils.dateparse import parse_date

from catalog.models import Cluster
from jobs.allocations import report, spend
from jobs.models import Allocation
from portal.users import find_user


class Command(BaseCommand):
    help = "Allocations: GPU-hours and tokens per user, group or Slurm account, per period."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        put = sub.add_parser("set", help="add an allocation, or replace the holder's on the same cluster")
        holder = put.add_mutually_exclusive_group(required=True)
        holder.add_argument("--user")
        holder.add_argument("--group")
        holder.add_argument("--slurm-account")
        put.add_argument("--cluster", help="a cluster's slug; default: every cluster together")
        put.add_argument("--gpu-hours", help="GPU-hours per period (e.g. 500 or 12.5)")
        put.add_argument("--tokens", type=int, help="prompt and completion tokens per period")
        put.add_argument("--period", required=True, choices=Allocation.Period.values)
        put.add_argument("--from", dest="starts_on", help="a term's first day (YYYY-MM-DD)")
        put.add_argument("--to", dest="ends_on", help="a term's last day (YYYY-MM-DD)")
        put.add_argument("--soft", type=int, default=80, help="percent spent at which the holder is mailed")
        put.add_argument("--action", dest="then", default="refuse", choices=Allocation.Action.values)
        put.add_argument("--manager", action="append", default=[], help="a user mailed at the thresholds (repeat)")
        listing = sub.add_parser("list")
        listing.add_argument("--json", action="store_true")
        show = sub.add_parser("show")
        show.add_argument("id", type=int)
        show.add_argument("--json", action="store_true")
        clear = sub.add_parser("clear")
        clear.add_argument("id", type=int)

    def handle(self, *args: Any, **o: Any) -> None:
        try:
            if o["action"] == "set":
                allocation, created = _set(o)
                verb = "added" if created else "replaced"
                self.stdout.write(f"{verb} allocation {allocation.pk}: {allocation}")
            elif o["action"] == "list":
                rows = [report.entry(a) for a in Allocation.objects.select_related("user", "group", "cluster")]
                if o["json"]:
                    self.stdout.write(json.dumps(rows, indent=2))
                for row in [] if o["json"] else rows:
                    self.stdout.write(_text(row))
            elif o["action"] == "show":
                allocation = _get(o["id"])
                row = report.entry(allocation)
                if o["json"]:
                    self.stdout.write(json.dumps(row, indent=2))
                else:
                    self.stdout.write(_text(row))
                    standing = spend.standing(allocation)
                    self.stdout.write(f"  {report.line(standing)}" if standing else "  not in force today")
            else:
                allocation = _get(o["id"])
                allocation.delete()
                self.stdout.write(f"cleared allocation {o['id']} ({allocation})")
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None


def _get(pk: int) -> Allocation:
    allocation = Allocation.objects.select_related("user", "group", "cluster").filter(pk=pk).first()
    if allocation is None:
        raise CommandError(f"no allocation {pk} (manage.py allocations list)")
    return allocation


def _set(o: dict[str, Any]) -> tuple[Allocation, bool]:
    holder: dict[str, Any] = {"user": None, "group": None, "slurm_account": ""}
    if o["user"]:
        holder["user"] = find_user(o["user"])
    elif o["group"]:
        holder["group"] = Group.objects.filter(name=o["group"]).first()
        if holder["group"] is None:
            raise CommandError(f"no group {o['group']!r}")
    else:
        holder["slurm_account"] = o["slurm_account"]
    cluster = None
    if o["cluster"]:
        cluster = Cluster.objects.filter(slug=o["cluster"]).first()
        if cluster is None:
            raise CommandError(f"no cluster {o['cluster']!r} (its slug, as manage.py catalog lists it)")
    managers = [find_user(name) for name in o["manager"]]
    values = {
        "gpu_hours": _hours(o["gpu_hours"]),
        "tokens": o["tokens"],
        "period": o["period"],
        "starts_on": _day("--from", o["starts_on"]),
        "ends_on": _day("--to", o["ends_on"]),
        "soft_percent": o["soft"],
        "action": o["then"],
    }
    if values["tokens"] is not None and values["tokens"] < 0:
        raise CommandError("--tokens cannot be negative")
    with transaction.atomic():
        allocation = Allocation.objects.select_for_update().filter(cluster=cluster, **holder).first()
        created = allocation is None
        allocation = allocation or Allocation(cluster=cluster, **holder)
        for name, value in values.items():
            setattr(allocation, name, value)
        allocation.full_clean()
        allocation.save()
        if managers or created:
            allocation.managers.set(managers)
    return allocation, created


def _hours(value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        hours = Decimal(value)
    except InvalidOperation:
        raise CommandError(f"--gpu-hours {value!r} is not a number") from None
    if not hours.is_finite() or hours < 0:
        raise CommandError(f"--gpu-hours {value!r} must be 0 or more")
    return hours.quantize(Decimal("0.01"))


def _day(flag: str, value: str | None) -> date | None:
    if not value:
        return None
    try:
        day = parse_date(value)
    except ValueError:  # well formed, no such day (2027-02-30)
        day = None
    if day is None:
        raise CommandError(f"{flag} {value!r} is not a date (YYYY-MM-DD)")
    return day


def _text(row: dict[str, Any]) -> str:
    limits = []
    if row["gpu_hours"] is not None:
        limits.append(f"{row['gpu_hours']:g} GPU-hours")
    if row["tokens"] is not None:
        limits.append(f"{row['tokens']:,} tokens")
    where = f" on {row['cluster']}" if row["cluster"] else ""
    term = f" {row['from']}..{row['to']}" if row["period"] == "term" else ""
    spent = f"  {row['percent']:g}% spent" if row["in_force"] else "  not in force"
    return (
        f"{row['id']:>4}  {row['holder']}{where}: {' and '.join(limits)} a {row['period']}{term}, "
        f"{row['action']} at 100%, mail at {row['soft_percent']}%{spent}"
    )
