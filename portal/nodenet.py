"""Compute-node networks: the only addresses the portal sends a request to on a session owner's word.

Where a model server listens comes from its job (connection.json) and from Slurm's answer about the job's nodes, and
the portal reads both through the owner's own cluster account, whose shell its user controls (`~/.bashrc` can wrap
`scontrol`): the owner can make either say anything. So neither decides where a request may go. The admin does, with
each cluster's compute-node networks (Cluster.node_networks): the portal resolves a host itself, takes it only when
every address it resolves to lies inside those networks, and then connects to the address it checked (pinned),
never to the name again, so no second lookup can answer differently (DNS rebinding). An empty list takes nothing.

Plain Python, no Django: the catalog's validator, the poll (jobs.sessions.lifecycle) and the way to a server
(jobs.cluster.backend, on every proxied request) share it.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Callable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], Sequence[str]]


class Refused(Exception):
    """The host is not to be sent requests: it resolves (or is) outside the networks, or not at all. The message says
    why, for the session's events."""


def parse(text: str) -> tuple[Network, ...]:
    """Networks as an admin writes them: CIDRs (a bare address is one address), separated by commas or white space.
    Raises ValueError naming the first item that is not one (host bits set included: 10.20.0.1/16 is a typo for
    either 10.20.0.0/16 or 10.20.0.1/32, and the portal does not guess which)."""
    networks: list[Network] = []
    for item in text.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not a network such as 10.20.0.0/16 or fd00:20::/64 ({exc})") from None
    return tuple(networks)


@functools.lru_cache(maxsize=256)
def networks(text: str) -> tuple[Network, ...]:
    """parse(), remembered (the proxy checks every request); nothing for text that does not parse, so a value that
    got past the validator somehow lets no request through rather than some."""
    try:
        return parse(text)
    except ValueError:
        return ()


def _plain(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (::ffff:10.0.0.9) is where the connection goes: its IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def inside(address: Address, within: Sequence[Network]) -> bool:
    """Whether the address lies in one of the networks. An IPv6 address with a zone (fe80::1%eth0) never does: it
    names a link of the portal host's, not a place on the cluster's network."""
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return False
    plain = _plain(address)
    return any(plain in network for network in within)  # an address of the other IP version is in none


def is_pinned(host: str, within: Sequence[Network]) -> bool:
    """Whether `host` is an IP address inside the networks, as pin() returns one: the check made again before each
    connection, with no lookup (a name here was never pinned, and gets nothing)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return inside(address, within)


def system_resolver(host: str) -> list[str]:
    """Every address the portal host's resolver gives for a name (/etc/hosts, DNS), in its order of preference."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]


def pin(host: str, within: Sequence[Network], resolve: Resolver | None = None) -> str:
    """The address to connect to for `host`: itself when it is an IP address, else the first address it resolves
    to here (system_resolver unless told). Every address the name resolves to must lie inside the networks, not only
    the first: the resolver may answer in another order next time. Raises Refused, saying why."""
    if not within:
        raise Refused("no compute-node networks are set for the cluster, so the portal sends requests to none")
    try:
        addresses: list[Address] = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            found = (resolve or system_resolver)(host)
        except (OSError, UnicodeError) as exc:
            raise Refused(f"it does not resolve on the portal host ({exc})") from None
        try:
            addresses = list(dict.fromkeys(ipaddress.ip_address(a) for a in found))
        except ValueError as exc:
            raise Refused(f"it resolves to something that is not an IP address ({exc})") from None
    if not addresses:
        raise Refused("it resolves to no address on the portal host")
    outside = [str(a) for a in addresses if not inside(a, within)]
    if outside:
        where = ", ".join(str(network) for network in within)
        raise Refused(f"{', '.join(outside)} {'is' if len(outside) == 1 else 'are'} outside the cluster's "
                      f"compute-node networks ({where})")  # fmt: skip
    return str(_plain(addresses[0]))  # an IPv4-mapped address as the IPv4 address it was checked as
