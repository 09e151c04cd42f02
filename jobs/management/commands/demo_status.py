"""The short status `make demo` prints once the portal answers: where it is, how to sign in, what runs, where each
process logs and how to follow it, how to stop. scripts/demo gathers the facts; this only words them."""

from __future__ import annotations

import json
import sys
from argparse import ArgumentParser
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

# What each process is, as the status names it (scripts/serve says how many processes each runs).
PROCESSES = {
    "web": "uvicorn: the pages, the chat and the API",
    "worker": "Celery worker: submits, polls, cancels",
    "beat": "Celery beat: polls every {poll} s",
}


@dataclass
class DemoState:
    url: str
    log_dir: str
    pids: dict[str, int]
    logins: list[str]  # demo_users' lines, passwords included
    database: str
    broker: str
    cluster: str = ""  # what the local cluster is, when it runs
    cluster_skipped: str = ""  # why it does not
    process_notes: dict[str, str] = field(default_factory=dict)


def status_lines(state: DemoState) -> list[str]:
    """The status, a line each, under 25 lines so that setup and status fit one screen together."""
    logs = state.log_dir.rstrip("/")
    lines = [
        "",
        f"Ready: {state.url}   (admin pages: {state.url}admin/)",
        "",
        "Sign in (new passwords on every start):",
        *(f"  {line.strip()}" for line in state.logins),
        "",
        "Running:",
    ]
    width = max((len(state.process_notes.get(name, "")) for name in state.pids), default=0)
    for name, pid in state.pids.items():
        note = state.process_notes.get(name, "")
        lines.append(f"  {name:<8}{note:<{width}}  pid {pid:<7} {logs}/{name}.log")
    if state.cluster:
        lines.append(f"  {'cluster':<8}{state.cluster}")
    else:
        lines.append(f"  {'cluster':<8}none: {state.cluster_skipped}")
    lines.append(f"  {'data':<8}{state.database}; {state.broker}")
    lines += [
        "",
        f"Logs: {logs}/ (one file per process; setup-*.log for the steps above). Follow one:",
        f"  tail -f {logs}/worker.log",
    ]
    if state.cluster:
        lines += [
            "Try it: sign in as researcher, Launch SmolLM2-135M-Instruct (Q4_1, llama.cpp), then Open chat.",
        ]
    lines.append(
        "Stop: Ctrl-C stops web, worker and beat" + ("; make cluster-down stops the cluster." if state.cluster else ".")
    )
    return lines


def describe_database(database: Mapping[str, Any], base: Path) -> str:
    """The default database in a few words, with no password."""
    engine = str(database.get("ENGINE", ""))
    if "sqlite" in engine:
        return f"SQLite {_relative(Path(str(database['NAME'])), base)}"
    if "postgresql" in engine:
        return f"PostgreSQL {database.get('HOST') or 'localhost'}:{database.get('PORT') or 5432}/{database['NAME']}"
    return engine.rsplit(".", 1)[-1]


def describe_broker(broker_url: str, folder: str, base: Path) -> str:
    """The Celery broker in a few words, with no password."""
    if broker_url.startswith("filesystem:"):
        return f"Celery broker: files in {_relative(Path(folder), base)} (no Redis)"
    parts = urlsplit(broker_url)
    return f"Celery broker: {parts.scheme.capitalize()} {parts.hostname}:{parts.port or 6379}"


def describe_cluster(cluster_json: Path) -> str:
    """The local cluster from the cluster.json scripts/local-cluster wrote."""
    facts = json.loads(cluster_json.read_text())
    return (
        f"local Slurm: {len(facts['nodes'])} nodes with fake GPUs, partitions {', '.join(facts['partitions'])}; "
        f"sshd {facts['host']}:{facts['port']}"
    )


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


class Command(BaseCommand):
    help = "Print the demo's status (scripts/demo): URL, sign-ins (read from stdin), processes, logs, how to stop."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--url", required=True)
        parser.add_argument("--log-dir", required=True)
        parser.add_argument("--pid", action="append", default=[], metavar="NAME=PID", help="web=123, worker=..")
        parser.add_argument("--cluster-json", help="the local cluster's cluster.json, when it runs")
        parser.add_argument("--cluster-skipped", default="", help="why the local cluster does not run")

    def handle(self, *args: Any, **options: Any) -> None:
        pids: dict[str, int] = {}
        for item in options["pid"]:
            name, _, pid = item.partition("=")
            if not pid.isdigit():
                raise CommandError(f"--pid takes NAME=PID, got {item!r}")
            pids[name] = int(pid)
        notes = {name: text.format(poll=settings.PORTAL_POLL_INTERVAL_S) for name, text in PROCESSES.items()}
        base = Path.cwd()
        folder = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("data_folder_in", "")
        state = DemoState(
            url=options["url"],
            log_dir=options["log_dir"],
            pids=pids,
            logins=[line for line in sys.stdin.read().splitlines() if line.strip()],
            database=describe_database(settings.DATABASES["default"], base),
            broker=describe_broker(settings.CELERY_BROKER_URL, str(Path(str(folder)).parent), base),
            cluster=describe_cluster(Path(options["cluster_json"])) if options["cluster_json"] else "",
            cluster_skipped=options["cluster_skipped"],
            process_notes=notes,
        )
        self.stdout.write("\n".join(status_lines(state)))
