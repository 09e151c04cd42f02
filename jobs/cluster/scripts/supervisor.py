"""Batch supervision on the compute node (docs/batch.md): which batch runs get a runner (batchrun.py), when a runner
that stopped is started again, and when the job gives a run up. Python standard library only.

    python3 supervisor.py --batch-dir DIR --runner batchrun.py --key-file api_key --model NAME --server URL ...
        [--run RUN --concurrency N]

With --run (a batch launch): that run alone; exit 0 once it is done, 1 once the job gave it up. Without (runs on a
running session): every run folder with a start mark, until the job stops (SIGTERM) or the job's shell is gone; a
stop mark stops a run's runner, and what it answered is kept.

One restart policy for both: a runner that stops before its run is done (killed, out of memory, a crash) is started
again, up to RESTARTS times; after that the run's error file says why and nothing starts it again. A runner takes up
where the last one stopped (batchrun.py records each answer once), so a restart costs only the requests in flight.

The folder's file names come from the environment, as the job's shell has them from the portal's layout
(jobs/cluster/layout.py): REQUESTS_FILE, RESULTS_FILE, PROGRESS_FILE, OUTPUT_FILE, CONCURRENCY_FILE, START_MARK,
STOP_MARK, RUN_ERROR_FILE.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RESTARTS = 5
NAMES = (
    "REQUESTS_FILE",
    "RESULTS_FILE",
    "PROGRESS_FILE",
    "OUTPUT_FILE",
    "CONCURRENCY_FILE",
    "START_MARK",
    "STOP_MARK",
    "RUN_ERROR_FILE",
)


def log(message: str) -> None:
    print(time.strftime("[%Y-%m-%d %H:%M:%S] portal: ") + message, flush=True)


def layout_names() -> dict[str, str]:
    missing = [name for name in NAMES if not os.environ.get(name)]
    if missing:
        raise SystemExit(f"supervisor: the job did not pass the layout's names: {', '.join(missing)}")
    return {name: os.environ[name] for name in NAMES}


@dataclass
class Run:
    folder: Path
    starts: int = 0
    runner: subprocess.Popen[bytes] | None = None
    last_code: int | None = None
    done: bool = False
    given_up: bool = False


@dataclass
class Supervisor:
    args: argparse.Namespace
    names: dict[str, str]
    runs: dict[str, Run] = field(default_factory=dict)
    stopping: bool = False

    def file(self, run: Run, name: str) -> Path:
        return run.folder / self.names[name]

    def wanted(self) -> list[Run]:
        """The runs to look after now: the launch's own, or each folder with a start mark and its requests."""
        batch_dir: Path = self.args.batch_dir
        if self.args.run:
            folders = [batch_dir / self.args.run]
        else:
            folders = sorted(p.parent for p in batch_dir.glob(f"*/{self.names['START_MARK']}"))
        for folder in folders:
            self.runs.setdefault(folder.name, Run(folder))
        return [self.runs[folder.name] for folder in folders]

    def concurrency(self, run: Run) -> int:
        try:
            value = int(self.file(run, "CONCURRENCY_FILE").read_text().strip())
        except (OSError, ValueError):
            value = int(self.args.concurrency)
        return min(max(value, 1), 256)

    def start(self, run: Run) -> None:
        run.starts += 1
        servers = [word for url in self.args.server for word in ("--server", url)]
        # The runner's command line starts "batchrun.py --requests <its folder>": operators (and the tests) find it so.
        argv = [
            sys.executable, str(self.args.runner),
            "--requests", str(self.file(run, "REQUESTS_FILE")), "--results", str(self.file(run, "RESULTS_FILE")),
            "--progress", str(self.file(run, "PROGRESS_FILE")), "--output", str(self.file(run, "OUTPUT_FILE")),
            *servers, "--key-file", str(self.args.key_file), "--model", self.args.model,
            "--concurrency", str(self.concurrency(run)), *(["--base-weights"] if self.args.base_weights else []),
        ]  # fmt: skip
        run.runner = subprocess.Popen(argv)

    def give_up(self, run: Run, why: str) -> None:
        run.given_up = True
        log(f"batch run {run.folder.name}: {why}")
        error = self.file(run, "RUN_ERROR_FILE")
        partial = error.with_name(f".{error.name}.tmp")
        partial.write_text(why + "\n")
        partial.replace(error)

    def look_after(self, run: Run) -> None:
        """One look at a run: stop its runner if asked, take note of a runner that ended, start one if it needs one."""
        if run.runner is not None:
            code = run.runner.poll()
            if code is None:
                if self.file(run, "STOP_MARK").exists():
                    run.runner.terminate()
                return
            code = 128 - code if code < 0 else code  # killed by a signal: the shell's way of saying it (137 for KILL)
            run.runner, run.last_code = None, code
            if code == 0:
                run.done = True
            elif not self.file(run, "STOP_MARK").exists():
                log(f"the runner of batch run {run.folder.name} stopped with code {code}")
        if run.done or run.given_up or self.stopped_or_ended(run):
            return
        if not self.file(run, "REQUESTS_FILE").is_file():
            self.give_up(run, f"its requests are missing ({self.file(run, 'REQUESTS_FILE')})")
            return
        if run.starts > RESTARTS:
            self.give_up(
                run, f"its runner stopped with code {run.last_code}, {run.starts} times; what it answered is kept"
            )
            return
        if run.starts:
            log(f"starting the runner of batch run {run.folder.name} again ({run.starts} of {RESTARTS} restarts)")
        else:
            log(f"starting the runner of batch run {run.folder.name}")
        self.start(run)

    def stopped_or_ended(self, run: Run) -> bool:
        """Asked to stop, finished by an earlier runner (a job started again after a requeue), or given up before."""
        names = ("STOP_MARK", "OUTPUT_FILE", "RUN_ERROR_FILE")
        return any(self.file(run, name).exists() for name in names)

    def outcome(self) -> int | None:
        """A launch's exit code once its run is done (0) or given up (1); None while it goes on, and always for
        runs on a running session, which end with the job."""
        if not self.args.run:
            return None
        run = self.runs.get(self.args.run)
        if run is None or run.runner is not None:
            return None
        if run.done or self.file(run, "OUTPUT_FILE").exists():
            return 0
        return 1 if run.given_up or self.file(run, "RUN_ERROR_FILE").exists() else None

    def stop_all(self) -> None:
        runners = [run.runner for run in self.runs.values() if run.runner is not None]
        for runner in runners:
            runner.terminate()
        deadline = time.monotonic() + 10
        for runner in runners:
            try:
                runner.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                runner.kill()

    def serve(self) -> int:
        parent = os.getppid()
        while not self.stopping and os.getppid() == parent:
            for run in self.wanted():
                self.look_after(run)
            code = self.outcome()
            if code is not None:
                return code
            time.sleep(self.args.interval)
        self.stop_all()
        return 143 if self.stopping else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-dir", type=Path, required=True, help="the session's folder of batch runs")
    parser.add_argument("--runner", type=Path, required=True, help="batchrun.py")
    parser.add_argument("--server", action="append", required=True, help="http://HOST:PORT; once per replica")
    parser.add_argument("--key-file", type=Path, required=True)
    parser.add_argument("--model", required=True, help="the name the servers answer to")
    parser.add_argument("--run", default="", help="a batch launch's run: supervise it alone and end with it")
    parser.add_argument("--concurrency", type=int, default=1, help="unless the run's folder says otherwise")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between looks")
    parser.add_argument("--base-weights", action="store_true", help="llama-server with adapters: none for the runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    supervisor = Supervisor(parse_args(argv), layout_names())

    def stop(signum: int, frame: object) -> None:
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return supervisor.serve()


if __name__ == "__main__":
    sys.exit(main())
