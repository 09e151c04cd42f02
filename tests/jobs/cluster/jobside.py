"""The job side's shell (jobs/cluster/scripts/*.sh) run by bash on this machine as a job would run it: the layout's
names and the session's values first, then the parts under test, then the test's own lines."""

from __future__ import annotations

import os
import shlex
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path

from jobs.cluster import layout
from jobs.cluster.jobscript import JOB_PARTS, SCRIPTS_DIR


def session_dir(home: Path, session: str) -> Path:
    """The session's directory under a home folder, made as the submit makes it."""
    path = home / layout.session_dir(session)
    path.mkdir(parents=True, exist_ok=True)
    return path


def script(values: Mapping[str, object], body: str, parts: tuple[str, ...] = JOB_PARTS) -> str:
    """A job script of the given parts with these values (SESSION_ID among them), ending with `body`."""
    lines = [layout.prelude(), "MODULES=()\n"]
    lines += [f"{name}={shlex.quote(str(value))}\n" for name, value in values.items()]
    lines += [(SCRIPTS_DIR / part).read_text() for part in parts]
    return "".join(lines) + "\n" + body + "\n"


def run(
    home: Path,
    body: str,
    values: Mapping[str, object] | None = None,
    parts: tuple[str, ...] = JOB_PARTS,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run `body` after the parts in a new session's directory under `home`; SESSION_ID is made up unless given."""
    values = {"SESSION_ID": str(uuid.uuid4()), **(values or {})}
    session_dir(home, str(values["SESSION_ID"]))
    base = {"HOME": str(home), "PATH": os.environ["PATH"], "USER": "tester"}
    return subprocess.run(
        ["bash", "-c", script(values, body, parts)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**base, **(env or {})},
    )
