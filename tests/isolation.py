"""Each pytest-xdist worker gets a var directory of its own: its test database, file cache, Prometheus counter files
and uploads, so that parallel workers never clear, count or read each other's. Loaded as a plugin (`-p
tests.isolation` in pyproject.toml), before pytest-django has Django read its settings, which take the folder from
PORTAL_VAR_DIR; without xdist it changes nothing."""

from __future__ import annotations

import os
from pathlib import Path

_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker:
    _base = Path(os.environ.get("PORTAL_VAR_DIR") or Path(__file__).resolve().parent.parent / "var")
    _own = _base / "workers" / _worker
    _own.mkdir(parents=True, exist_ok=True)
    os.environ["PORTAL_VAR_DIR"] = str(_own)
    # The controller's settings exported its counter folder to every worker it started (portal/settings.py).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_own / "metrics")
    os.environ.pop("PORTAL_METRICS_DIR", None)
