"""Checking an account's way in to its cluster: log in and ask Slurm something harmless (the accounts page's test)."""

from __future__ import annotations

from dataclasses import dataclass

from catalog.models import ClusterAccount
from portal import gate, gate_program, ssh


@dataclass(frozen=True)
class LoginCheck:
    ok: bool
    message: str  # what worked, or precisely what did not


# Something harmless Slurm answers: its partitions.
HELLO = gate.Verb("hello", "sinfo -h -o %P\n")
VERBS = (HELLO,)


def _ask(account: ClusterAccount) -> ssh.CommandResult:
    command = gate.command(HELLO, [], account.cluster.slurm_cli, gated=account.restricted)
    return account.run(command, timeout_s=20)


def _other_kind(account: ClusterAccount, result: ssh.CommandResult) -> bool:
    """Whether the answer shows the key's line is the other kind: a gate refusing a plain command, or a shell that
    has no gate to run."""
    if account.restricted:
        return result.exit_code == 127 and gate.GATE_WORD in result.stderr
    return result.exit_code == gate_program.REFUSED and gate.GATE_WORD in result.stderr


def check(account: ClusterAccount) -> LoginCheck:
    """Log in and ask Slurm something harmless; learn on the way whether the key's line is restricted (the gate
    answers), and keep that, so the portal speaks to the key as its line says."""
    try:
        result = _ask(account)
        if _other_kind(account, result):
            account.restricted = not account.restricted
            account.save(update_fields=["restricted"])
            result = _ask(account)
    except ssh.SSHError as exc:
        return LoginCheck(False, str(exc))
    if not result.ok:
        return LoginCheck(False, f"Logged in, but sinfo failed: {result.stderr.strip()[:300]}")
    partitions = " ".join(result.stdout.split())
    kind = (
        "restricted key: it runs only the portal's gate"
        if account.restricted
        else "plain key: it can run anything as you; `manage.py accounts key` prints a line that restricts it"
    )
    return LoginCheck(True, f"Connected as {account.username} ({kind}); Slurm answers (partitions: {partitions}).")
