"""Compute-node networks: what an admin writes, and which hosts the portal takes, and at which address."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest
from django.core.exceptions import ValidationError
from hypothesis import given
from hypothesis import strategies as st

from catalog import validators
from portal import nodenet

LOOPBACK_ONE = nodenet.parse("127.0.0.1/32")


def resolver(answers: dict[str, Sequence[str]]) -> nodenet.Resolver:
    """A resolver that knows these names and no other (unit tests look nothing up)."""

    def resolve(host: str) -> Sequence[str]:
        if host not in answers:
            raise OSError(f"[Errno -2] Name or service not known: {host!r}")
        return answers[host]

    return resolve


def test_an_admin_writes_networks_as_cidrs_of_either_ip_version_separated_by_commas_or_spaces() -> None:
    assert nodenet.parse("10.20.0.0/16, fd00:20::/64 192.168.7.5") == (
        ipaddress.ip_network("10.20.0.0/16"),
        ipaddress.ip_network("fd00:20::/64"),
        ipaddress.ip_network("192.168.7.5/32"),
    )
    assert nodenet.parse("") == () and nodenet.parse(" , ") == ()


@pytest.mark.parametrize("text", ["10.20.0.1/16", "10.20.0.0/33", "node[1-4]", "10.20.0.0/16;", "fd00::/129", "*"])
def test_what_is_not_a_network_is_refused_by_the_validator_and_lets_nothing_through_at_run_time(text: str) -> None:
    with pytest.raises(ValidationError, match=r"is not a network such as 10\.20\.0\.0/16"):
        validators.node_network_list(f"10.30.0.0/16, {text}")
    assert nodenet.networks(f"10.30.0.0/16, {text}") == ()  # however it got stored: no network at all


networks_strategy = st.lists(
    st.one_of(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(lambda n: ipaddress.IPv4Network(n, strict=False)),
        st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
            lambda n: ipaddress.IPv6Network(n, strict=False)
        ),
    ),
    max_size=6,
)


@given(networks_strategy, st.sampled_from([",", ", ", " ", "\n"]))
def test_networks_read_back_as_written(networks: list[nodenet.Network], separator: str) -> None:
    assert nodenet.parse(separator.join(str(n) for n in networks)) == tuple(networks)


def test_an_ip_address_inside_the_networks_is_its_own_pinned_address() -> None:
    assert nodenet.pin("127.0.0.1", LOOPBACK_ONE, resolver({})) == "127.0.0.1"
    assert nodenet.pin("::1", nodenet.parse("::1/128"), resolver({})) == "::1"


def test_an_ip_address_outside_the_networks_is_refused() -> None:
    with pytest.raises(nodenet.Refused, match=r"127\.0\.0\.2 is outside the cluster's compute-node networks"):
        nodenet.pin("127.0.0.2", LOOPBACK_ONE, resolver({}))
    with pytest.raises(nodenet.Refused, match="outside"):
        nodenet.pin("::1", nodenet.parse("127.0.0.0/8"), resolver({}))  # IPv6 is in no IPv4 network
    with pytest.raises(nodenet.Refused, match="outside"):
        nodenet.pin("::ffff:127.0.0.2", LOOPBACK_ONE, resolver({}))  # IPv4-mapped: checked as where it connects to
    assert nodenet.pin("::ffff:127.0.0.1", LOOPBACK_ONE, resolver({})) == "127.0.0.1"


def test_a_name_is_pinned_to_the_address_it_resolves_to_inside_the_networks() -> None:
    assert nodenet.pin("node1", LOOPBACK_ONE, resolver({"node1": ["127.0.0.1"]})) == "127.0.0.1"
    six = resolver({"node1": ["::1"]})
    assert nodenet.pin("node1", nodenet.parse("::1/128"), six) == "::1"


def test_a_name_that_resolves_outside_the_networks_is_refused() -> None:
    with pytest.raises(nodenet.Refused, match=r"127\.0\.0\.2 is outside"):
        nodenet.pin("node1", LOOPBACK_ONE, resolver({"node1": ["127.0.0.2"]}))
    with pytest.raises(nodenet.Refused, match=r"::1 is outside"):
        nodenet.pin("node1", LOOPBACK_ONE, resolver({"node1": ["::1"]}))


def test_a_name_with_several_addresses_is_refused_when_any_one_is_outside() -> None:
    # Whichever comes first now, the resolver may put the other first at the next lookup.
    for order in (["127.0.0.1", "127.0.0.2"], ["127.0.0.2", "127.0.0.1"], ["127.0.0.1", "::1"]):
        with pytest.raises(nodenet.Refused, match="outside"):
            nodenet.pin("node1", LOOPBACK_ONE, resolver({"node1": order}))
    both = nodenet.parse("127.0.0.0/8, ::1/128")
    assert nodenet.pin("node1", both, resolver({"node1": ["::1", "127.0.0.1", "::1"]})) == "::1"


def test_a_name_that_does_not_resolve_or_no_networks_at_all_is_refused() -> None:
    with pytest.raises(nodenet.Refused, match="does not resolve on the portal host"):
        nodenet.pin("node9", LOOPBACK_ONE, resolver({}))
    with pytest.raises(nodenet.Refused, match="no compute-node networks are set"):
        nodenet.pin("127.0.0.1", (), resolver({}))


def test_an_address_with_a_zone_is_in_no_network() -> None:
    link_local = nodenet.parse("fe80::/10")
    with pytest.raises(nodenet.Refused, match="outside"):
        nodenet.pin("node1", link_local, resolver({"node1": ["fe80::1%lo"]}))
    assert not nodenet.is_pinned("fe80::1%lo", link_local) and nodenet.is_pinned("fe80::1", link_local)


def test_only_an_ip_address_counts_as_pinned() -> None:
    assert nodenet.is_pinned("127.0.0.1", LOOPBACK_ONE)
    assert not nodenet.is_pinned("localhost", LOOPBACK_ONE)  # a name is never looked up again
    assert not nodenet.is_pinned("127.0.0.2", LOOPBACK_ONE)
    assert not nodenet.is_pinned("127.0.0.1", ())
