"""Tests and benchmarks send traffic only to this machine: no test module writes an address other than loopback where
the portal could send a request to it (a session's host, a connection file, a node's address in a poll, an upstream
URL), so that even with the check under test broken, nothing leaves for a private, link-local or public address.

Checked on the source: every string that is a `host` (a keyword, a dict key, an attribute, an item) and every string
that holds one (JSON with a "host", Slurm's NodeAddr= and NodeHostName=, a URL) may hold only loopback IP addresses.
Strings that never become a destination (networks as an admin writes them, a catalog's login hosts, validators'
inputs, recorded Slurm output in tests/portal/data) are not in those places and are not read here."""

from __future__ import annotations

import ast
import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOST_KEYS = {"host", "hostname"}
# Text that carries a destination: JSON with a host, a node's addresses as scontrol prints them, a URL.
CARRIES = re.compile(r'"host(name)?"\s*:|NodeAddr=|NodeHostName=|https?://', re.IGNORECASE)
IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")
TOKEN = re.compile(r"[0-9A-Fa-f:.%]+")


def addresses(text: str) -> Iterator[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every IP address written in the text: dotted quads anywhere, IPv6 as a token of its own or in brackets."""
    for found in IPV4.findall(text):
        try:
            yield ipaddress.IPv4Address(found)
        except ValueError:
            continue
    for token in TOKEN.findall(text):
        for candidate in {token, token.strip(":.")} if token.count(":") >= 2 else ():
            try:
                yield ipaddress.IPv6Address(candidate)
            except ValueError:
                continue


def text_of(node: ast.AST) -> str | None:
    """A string literal, or an f-string's literal parts (each placeholder a space)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return " ".join(part.value if isinstance(part, ast.Constant) else " " for part in node.values)  # type: ignore[misc]
    return None


def destinations(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, text) of every string written where it names or carries a destination."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg in HOST_KEYS and (text := text_of(keyword.value)) is not None:
                    yield keyword.value.lineno, text
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if key is not None and text_of(key) in HOST_KEYS and (text := text_of(value)) is not None:
                    yield value.lineno, text
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                named = target.attr if isinstance(target, ast.Attribute) else None
                if isinstance(target, ast.Subscript):
                    named = text_of(target.slice)
                if named in HOST_KEYS and (text := text_of(node.value)) is not None:
                    yield node.value.lineno, text
        if (text := text_of(node)) is not None and CARRIES.search(text):
            yield getattr(node, "lineno", 0), text


def not_on_this_machine(source: str) -> list[str]:
    """`line: address` for each address off this machine that the source writes where a request could go."""
    found = []
    for line, text in destinations(ast.parse(source)):
        found += [f"{line}: {address}" for address in addresses(text) if not address.is_loopback]
    return sorted(set(found))


def modules() -> list[Path]:
    """Every module of the tests and benchmarks but this one (whose examples below are the forged addresses)."""
    return [path for folder in ("tests", "bench") for path in sorted((REPO / folder).rglob("*.py"))
            if "data" not in path.relative_to(REPO).parts and path != Path(__file__).resolve()]  # fmt: skip


@pytest.mark.parametrize("path", modules(), ids=lambda path: str(path.relative_to(REPO)))
def test_no_test_or_benchmark_writes_an_address_off_this_machine_where_a_request_could_go(path: Path) -> None:
    assert not_on_this_machine(path.read_text()) == []


def test_the_check_finds_an_address_in_every_place_a_request_could_go_to() -> None:
    forged = [
        'transition(pk, State.RUNNING, cause="test", host="10.0.0.7", port=8080)',
        'LLMSession.objects.filter(pk=pk).update(host="192.168.1.1")',
        'connection = {"host": "169.254.169.254", "port": 80}',
        'session.host = "172.16.0.1"',
        'record["host"] = "fd00::5"',
        '(folder / "connection.json").write_text(\'{"host": "10.0.0.1", "port": 1}\')',
        'poll = f"@@nodes 0\\nNodeName={node} NodeAddr=10.0.0.9:2375/x#"',
        'base = httpx.URL("http://8.8.8.8:8080")',
        'url = f"http://[2001:db8::1]:{port}/v1"',
    ]
    for line in forged:
        assert not_on_this_machine(line), line
    kept = [
        'transition(pk, State.RUNNING, cause="test", host="127.0.0.7", port=8080)',
        'connection = {"host": "::1", "port": 80}',
        'poll = f"NodeName=node1 NodeAddr=127.0.0.2:{port}/heard?x=#"',
        'cluster.node_networks = "10.20.0.0/16"',  # a network an admin writes, never a destination
        'assert validators.network_host("10.0.0.5")',
    ]
    for line in kept:
        assert not not_on_this_machine(line), line
