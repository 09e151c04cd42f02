"""The allow-lists for values that reach a shell (portal/shellsafe.py): what they accept is one plain shell word, the
models' validators are built from them, and no other module defines an allow-list of its own."""

from __future__ import annotations

import ast
import ipaddress
import re
import shlex
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError
from hypothesis import given
from hypothesis import strategies as st

from catalog import validators
from portal import shellsafe

REPO = Path(__file__).resolve().parent.parent.parent
ALLOW_LISTS = {name: value for name, value in vars(shellsafe).items() if isinstance(value, shellsafe.AllowList)}


def is_plain_word(allowed: shellsafe.AllowList, value: str) -> bool:
    """The promise: a value needs no quoting and holds no newline or NUL (the empty string and `expands` aside)."""
    return (
        value == ""
        or value in allowed.expands
        or (shlex.quote(value) == value and "\n" not in value and "\x00" not in value)
    )


@pytest.mark.parametrize("name", sorted(ALLOW_LISTS))
def test_what_an_allow_list_accepts_needs_no_quoting_in_a_shell(name: str) -> None:
    allowed = ALLOW_LISTS[name]

    @given(st.from_regex(allowed.pattern))
    def values_it_matches(value: str) -> None:
        if allowed.accepts(value):
            assert is_plain_word(allowed, value), value

    @given(st.text(max_size=80) | st.text(alphabet="aZ09_.-/+@:$ '\"\n;&|`()[]{}*?!~#=,\\", max_size=40))
    def any_text(value: str) -> None:
        if allowed.accepts(value):
            assert is_plain_word(allowed, value), value

    values_it_matches()
    any_text()


@pytest.mark.parametrize("name", sorted(ALLOW_LISTS))
def test_a_trailing_newline_is_refused(name: str) -> None:
    allowed = ALLOW_LISTS[name]
    for value in ("a", "/a", "8.0", "1", "0f8e6c2a-1b2c-4d3e-8f90-123456789abc", "0" * 64, "$TMPDIR"):
        if allowed.accepts(value):
            assert not allowed.accepts(value + "\n")


def test_check_returns_the_value_or_says_what_is_allowed() -> None:
    assert shellsafe.SLURM_NAME.check("gpu_devel", "partition") == "gpu_devel"
    with pytest.raises(shellsafe.UnsafeValue, match=r"not a valid partition: 'gpu;id'\. Slurm names use"):
        shellsafe.SLURM_NAME.check("gpu;id", "partition")
    with pytest.raises(shellsafe.UnsafeValue, match="at most 64"):
        shellsafe.SLURM_NAME.check("p" * 65, "partition")
    assert not shellsafe.UUID.accepts(None) and not shellsafe.UUID.accepts(42)


def test_the_jobs_tmpdir_is_the_one_word_staging_takes_unquoted() -> None:
    assert shellsafe.STAGE_TARGET.accepts("$TMPDIR") and shellsafe.STAGE_TARGET.accepts("/dev/shm")
    for value in ("$HOME", "$TMPDIR/x", "${TMPDIR}", "relative"):
        assert not shellsafe.STAGE_TARGET.accepts(value)


def test_flags_split_as_a_shell_splits_them_or_are_refused() -> None:
    assert shellsafe.split_flags("--ctx-size 4096 --alias 'my model'") == ["--ctx-size", "4096", "--alias", "my model"]
    with pytest.raises(shellsafe.UnsafeValue, match="Cannot split"):
        shellsafe.split_flags("--alias 'open")
    with pytest.raises(shellsafe.UnsafeValue, match="newlines"):
        shellsafe.split_flags("--alias 'two\nlines'")
    with pytest.raises(ValidationError, match="newlines"):
        validators.shell_flags("--alias 'two\nlines'")


def test_the_models_validators_are_the_allow_lists() -> None:
    """Same regex, same message: a model field's validator deconstructs as before, so no migration follows."""
    built = {
        "slug_name": shellsafe.SLUG,
        "slurm_name": shellsafe.SLURM_NAME,
        "slurm_account": shellsafe.SLURM_ACCOUNT,
        "hostname": shellsafe.HOSTNAME,
        "model_name": shellsafe.MODEL_NAME,
        "absolute_path": shellsafe.ABSOLUTE_PATH,
        "command_or_path": shellsafe.COMMAND_OR_PATH,
        "ollama_tag": shellsafe.OLLAMA_TAG,
        "module_name": shellsafe.MODULE_NAME,
        "compute_capability": shellsafe.COMPUTE_CAPABILITY,
        "stage_target": shellsafe.STAGE_TARGET,
        "tag": shellsafe.TAG,
        "unix_username": shellsafe.UNIX_USERNAME,
    }
    for name, allowed in built.items():
        validator = getattr(validators, name)
        assert (validator.regex.pattern, validator.message) == (allowed.regex, allowed.message), name


# --- one definition of each allow-list ---------------------------------------------------------------------------

REGEX_CALLS = {"compile", "match", "fullmatch", "search", "RegexValidator"}
# Anchored patterns without groups outside portal/shellsafe.py that are no allow-list for a shell, and why.
NOT_FOR_A_SHELL = {
    ("jobs/sessions/access.py", r"[0-9a-f-]{4,36}\Z"): "a uuid's prefix typed in an address, looked up in the database",
    ("jobs/models/sessions.py", r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z"): "a session's alias, a model name for the API",
    # adaptercopy.py runs on a login host's python3 with the standard library only (it cannot import portal.shellsafe):
    # the names inside a tar it unpacks, and the checksum the gate already held to shellsafe.SHA256.
    ("jobs/cluster/adaptercopy.py", r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,254}\Z"): "a name's part inside the tar",
    ("jobs/cluster/adaptercopy.py", r"[0-9a-f]{64}\Z"): "the copy's checksum, checked by the gate before",
}


def regex_literals(path: Path) -> list[tuple[str, str]]:
    """Each (call, pattern) where a literal pattern goes to re.compile/match/fullmatch/search or RegexValidator."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        first = node.args[0]
        if name in REGEX_CALLS and isinstance(first, ast.Constant) and isinstance(first.value, str):
            found.append((name, first.value))
    return found


def is_allow_list(call: str, pattern: str) -> bool:
    """A whole-value check: anchored at the end (or fullmatch-ed) and taking nothing apart (no groups)."""
    try:
        groups = re.compile(pattern).groups
    except re.error:
        return False
    return groups == 0 and (call == "fullmatch" or pattern.endswith(("\\Z", "$")))


def test_no_module_defines_an_allow_list_of_its_own() -> None:
    own, excused = [], set()
    for app in ("portal", "catalog", "jobs"):
        for path in sorted((REPO / app).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            if "migrations" in path.parts or relative == "portal/shellsafe.py":
                continue
            for call, pattern in regex_literals(path):
                if not is_allow_list(call, pattern):
                    continue
                if (relative, pattern) in NOT_FOR_A_SHELL:
                    excused.add((relative, pattern))
                else:
                    own.append(f"{relative}: {call}({pattern!r})")
    assert not own, "define allow-lists in portal/shellsafe.py:\n" + "\n".join(own)
    assert excused == set(NOT_FOR_A_SHELL), "excused patterns that are gone: remove them from NOT_FOR_A_SHELL"


def test_the_layout_check_finds_the_copies_it_was_written_for() -> None:
    assert is_allow_list("compile", r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # jobscript's _SLURM_NAME, once
    assert is_allow_list("fullmatch", r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    assert is_allow_list("RegexValidator", r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
    assert not is_allow_list("compile", r"(?P<days>\d+)-(?P<hours>\d+)")  # a parser takes its text apart


@pytest.mark.parametrize("value", ["node1", "node1.cluster.example.edu", "10.0.0.5", "127.0.0.1", "::1", "fd00::5"])
def test_a_network_host_is_a_host_name_or_an_ip_address(value: str) -> None:
    assert shellsafe.network_host(value)


@pytest.mark.parametrize(
    "value", ["127.0.0.1:9/x?#", "node1:8080", "a@node1", "node1/x", "node1#", "node1?", "[::1]", "fe80::1%eth0", ":::"]
)
def test_a_network_host_carries_no_port_path_user_or_zone(value: str) -> None:
    assert not shellsafe.network_host(value)


@given(st.text(max_size=60) | st.text(alphabet="aZ09.:-/?#@[]%", max_size=40))
def test_what_a_url_takes_as_a_network_host_is_only_a_host(value: str) -> None:
    if shellsafe.network_host(value):
        assert not set(value) & set("/?#@[]% \n\x00")
        assert ":" not in value or ipaddress.ip_address(value).version == 6
