"""Settings are read in a fresh interpreter per case, as a real process start would read them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = (
    "import json, django; from django.conf import settings; django.setup(); "
    "print(json.dumps({'engine': settings.DATABASES['default']['ENGINE'], "
    "'name': str(settings.DATABASES['default']['NAME']), 'broker': settings.CELERY_BROKER_URL, "
    "'debug': settings.DEBUG}))"
)


def run_settings(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_DEBUG")}
    environ.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "PORTAL_VAR_DIR": str(tmp_path / "var"), **env})
    return subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=environ, capture_output=True, text=True)


def test_embedded_defaults_need_no_server(tmp_path: Path) -> None:
    result = run_settings(tmp_path)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["engine"] == "django.db.backends.sqlite3"
    assert values["name"].startswith(str(tmp_path / "var"))
    assert values["broker"] == "filesystem://"
    assert values["debug"] is False
    assert (tmp_path / "var" / "broker" / "queue").is_dir()
    assert oct((tmp_path / "var" / "secret_key").stat().st_mode & 0o777) == "0o600"


def test_database_and_redis_urls_switch_to_postgres_and_redis(tmp_path: Path) -> None:
    result = run_settings(
        tmp_path, DATABASE_URL="postgres://portal:pw@db.example:5432/portal", REDIS_URL="redis://cache:6379/0"
    )
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["engine"] == "django.db.backends.postgresql"
    assert values["name"] == "portal"
    assert values["broker"] == "redis://cache:6379/0"


def test_bad_values_stop_the_process_with_the_variable_named(tmp_path: Path) -> None:
    result = run_settings(tmp_path, DJANGO_DEBUG="sometimes")
    assert result.returncode != 0
    assert "DJANGO_DEBUG='sometimes' is not a boolean" in result.stderr
    result = run_settings(tmp_path, DATABASE_URL="nosuchdb://x/y")
    assert result.returncode != 0
    assert "DATABASE_URL cannot be used" in result.stderr


def test_the_var_folder_and_the_database_are_the_portals_alone(tmp_path: Path) -> None:
    result = run_settings(tmp_path)
    assert result.returncode == 0, result.stderr
    var = tmp_path / "var"
    modes = {path: oct(path.stat().st_mode & 0o777) for path in (var, var / "broker" / "queue", var / "portal.sqlite3")}
    assert modes == {var: "0o700", var / "broker" / "queue": "0o700", var / "portal.sqlite3": "0o600"}


def test_a_database_elsewhere_leaves_its_folder_as_it_was(tmp_path: Path) -> None:
    shared = tmp_path / "srv"
    shared.mkdir(mode=0o755)
    shared.chmod(0o1777)  # a folder like /tmp: the portal must not close it to everyone else
    result = run_settings(tmp_path, PORTAL_SQLITE_PATH=str(shared / "portal.sqlite3"))
    assert result.returncode == 0, result.stderr
    assert oct(shared.stat().st_mode & 0o7777) == "0o1777"
    assert oct((shared / "portal.sqlite3").stat().st_mode & 0o777) == "0o600"
    made = tmp_path / "new" / "db"
    assert run_settings(tmp_path, PORTAL_SQLITE_PATH=str(made / "portal.sqlite3")).returncode == 0
    assert oct(made.stat().st_mode & 0o777) == "0o700"


def test_sqlite_runs_with_write_ahead_logging(tmp_path: Path) -> None:
    probe = "import django; django.setup(); from django.db import connection; c = connection.cursor(); "
    probe += "print(c.execute('PRAGMA journal_mode').fetchone()[0], c.execute('PRAGMA synchronous').fetchone()[0])"
    environ = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    environ.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "PORTAL_VAR_DIR": str(tmp_path / "var")})
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=environ, capture_output=True, text=True)
    assert result.stdout.split() == ["wal", "1"], result.stderr  # synchronous 1: NORMAL


def check_deploy(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A production host's environment: none of this test run's own settings (pytest-django's async flag among them)."""
    inherited = ("DATABASE_URL", "REDIS_URL")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PORTAL_")) and k not in inherited}
    environ.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "PORTAL_VAR_DIR": str(tmp_path / "var"), **env})
    command = [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"]
    return subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True)


# The production settings docs/admin-guide.md lists (a key of Django's recommended length, the site's name).
PRODUCTION = {
    "DJANGO_SECRET_KEY": "k" * 20 + "Q7r#e9!vXz2@pL5$wN8^tB1&yH4*mC6(jF0)sD3-gK",
    "DJANGO_ALLOWED_HOSTS": "llm.example.edu",
    "PORTAL_HTTPS": "1",
}


def test_check_deploy_is_clean_with_the_documented_production_settings(tmp_path: Path) -> None:
    clean = check_deploy(tmp_path, **PRODUCTION)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    plain_http = check_deploy(tmp_path, **{**PRODUCTION, "PORTAL_HTTPS": "0"})
    assert plain_http.returncode != 0 and "SECURE_SSL_REDIRECT" in plain_http.stdout + plain_http.stderr
