"""Checking an account's way in to its cluster: log in and ask Slurm something harmless (the accounts page's test)."""

from __future__ import annotations

from dataclasses import dataclass

from catalog.models import ClusterAccount
from portal import ssh


@dataclass(frozen=True)
class LoginCheck:
    ok: bool
    message: str  # what worked, or precisely what did not


def check(account: ClusterAccount) -> LoginCheck:
    try:
        result = ssh.pool.run(
            account.ssh_target(), account.cluster.slurm_cli.command("sinfo", "-h", "-o", "%P"), timeout_s=20
        )
    except ssh.SSHError as exc:
        return LoginCheck(False, str(exc))
    if not result.ok:
        return LoginCheck(False, f"Logged in, but sinfo failed: {result.stderr.strip()[:300]}")
    partitions = " ".join(result.stdout.split())
    return LoginCheck(True, f"Connected as {account.username}; Slurm answers (partitions: {partitions}).")
