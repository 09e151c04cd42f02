"""PostgreSQL and Redis take the same code path as the embedded SQLite and filesystem broker."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from catalog.yaml_io import export_catalog
from tests.conftest import EXAMPLE_CATALOG, REPO
from tests.worker import clean_env, ping_through_worker

pytestmark = pytest.mark.e2e


def manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.django_db
def test_postgres_migrates_imports_and_exports_exactly_like_sqlite(
    local_services: dict[str, str], example_catalog: Path, tmp_path: Path
) -> None:
    admin_url = local_services["DATABASE_URL"]
    name = f"portal_e2e_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        parts = urlsplit(admin_url)
        env = clean_env(tmp_path / "var", DATABASE_URL=urlunsplit(parts._replace(path=f"/{name}")))
        manage(env, "migrate", "--noinput")
        manage(env, "catalog", "import", str(EXAMPLE_CATALOG))
        again = manage(env, "catalog", "import", str(EXAMPLE_CATALOG))
        assert "already matches" in again
        # The test database here is SQLite with the same file imported: both export the same text.
        assert manage(env, "catalog", "export") == export_catalog()
        with psycopg.connect(env["DATABASE_URL"]) as conn:
            assert conn.execute("SELECT count(*) FROM catalog_cluster").fetchone() == (7,)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_worker_runs_a_task_sent_through_redis(local_services: dict[str, str], tmp_path: Path) -> None:
    log = ping_through_worker(clean_env(tmp_path / "var", REDIS_URL=local_services["REDIS_URL"]))
    assert any("redis://" in line for line in log)
