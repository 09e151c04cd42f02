"""Read settings from the environment and fail loudly on values that do not parse.

Kept apart from settings.py so the helpers can be unit-tested without configuring Django.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ImproperlyConfiguredEnv(ValueError):
    """A variable is set to something the portal cannot use; the message names it."""


def env_str(name: str, default: str = "", environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return environ.get(name, default)


def env_bool(name: str, default: bool = False, environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    if name not in environ:
        return default
    raw = environ[name].strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ImproperlyConfiguredEnv(f"{name}={environ[name]!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def env_int(
    name: str,
    default: int,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    environ = os.environ if environ is None else environ
    if name not in environ:
        return default
    try:
        value = int(environ[name].strip())
    except ValueError:
        raise ImproperlyConfiguredEnv(f"{name}={environ[name]!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfiguredEnv(f"{name}={value} is below the minimum {minimum}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfiguredEnv(f"{name}={value} is above the maximum {maximum}")
    return value


def env_list(name: str, default: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    if name not in environ:
        return list(default)
    return [item.strip() for item in environ[name].split(",") if item.strip()]


def env_secret(name: str, default: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """Read NAME, or the file named by NAME_FILE (docker/Kubernetes secrets); never both."""
    environ = os.environ if environ is None else environ
    file_var = f"{name}_FILE"
    if name in environ and file_var in environ:
        raise ImproperlyConfiguredEnv(f"set {name} or {file_var}, not both")
    if file_var in environ:
        path = environ[file_var]
        try:
            with open(path, encoding="utf-8") as fh:
                value = fh.read().strip()
        except OSError as exc:
            raise ImproperlyConfiguredEnv(f"{file_var}={path!r} cannot be read: {exc.strerror}") from None
        if not value:
            raise ImproperlyConfiguredEnv(f"{file_var}={path!r} is empty")
        return value
    if name in environ:
        if not environ[name].strip():
            raise ImproperlyConfiguredEnv(f"{name} is set but empty")
        return environ[name]
    return default
