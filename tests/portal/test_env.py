from __future__ import annotations

import pytest

from portal.env import ImproperlyConfiguredEnv, env_bool, env_int, env_list, env_secret


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("yes", True), ("ON", True), ("0", False), ("off", False)])
def test_env_bool_reads_common_spellings(raw: str, expected: bool) -> None:
    assert env_bool("X", not expected, environ={"X": raw}) is expected


def test_env_bool_rejects_anything_else_naming_the_variable() -> None:
    with pytest.raises(ImproperlyConfiguredEnv, match="DJANGO_DEBUG='maybe' is not a boolean"):
        env_bool("DJANGO_DEBUG", environ={"DJANGO_DEBUG": "maybe"})


def test_env_bool_uses_default_when_unset() -> None:
    assert env_bool("X", True, environ={}) is True


def test_env_int_checks_type_and_bounds() -> None:
    assert env_int("N", 5, environ={"N": " 42 "}) == 42
    with pytest.raises(ImproperlyConfiguredEnv, match="not an integer"):
        env_int("N", 5, environ={"N": "4x"})
    with pytest.raises(ImproperlyConfiguredEnv, match="below the minimum 1"):
        env_int("N", 5, minimum=1, environ={"N": "0"})
    with pytest.raises(ImproperlyConfiguredEnv, match="above the maximum 10"):
        env_int("N", 5, maximum=10, environ={"N": "11"})


def test_env_list_splits_on_commas_and_drops_blanks() -> None:
    assert env_list("H", [], environ={"H": "a.example, b.example,,"}) == ["a.example", "b.example"]


def test_env_secret_reads_a_file(tmp_path) -> None:
    secret = tmp_path / "key"
    secret.write_text("s3cret\n")
    assert env_secret("K", environ={"K_FILE": str(secret)}) == "s3cret"


def test_env_secret_refuses_both_forms_and_missing_or_empty_files(tmp_path) -> None:
    with pytest.raises(ImproperlyConfiguredEnv, match="not both"):
        env_secret("K", environ={"K": "a", "K_FILE": "/x"})
    with pytest.raises(ImproperlyConfiguredEnv, match="cannot be read"):
        env_secret("K", environ={"K_FILE": str(tmp_path / "missing")})
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ImproperlyConfiguredEnv, match="is empty"):
        env_secret("K", environ={"K_FILE": str(empty)})
    with pytest.raises(ImproperlyConfiguredEnv, match="set but empty"):
        env_secret("K", environ={"K": " "})
