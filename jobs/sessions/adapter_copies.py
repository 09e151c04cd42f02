"""A shared adapter copied into the home of the session's cluster user (docs/finetune.md, sharing): a session's job
reads each adapter from its own cluster user's home, so when a session loads a run's adapter through an account of
another cluster user of the run's cluster, its submit first copies the adapter there (`$ADAPTERS_DIR/<run uuid>`,
jobs/cluster/layout.py), and its job script names that run among the copies (`COPIED_ADAPTERS`).

The copy goes through the portal: the run's account archives the adapter's files (ADAPTER_DIR and the GGUF the run
made for llama.cpp), the session's account unpacks them (jobs/cluster/adaptercopy.py: plain files only, bounded, into
a temporary directory renamed whole), each by a named command a restricted key's gate runs (jobs/cluster/remote.py).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

from django.conf import settings

from catalog.models import ClusterAccount
from jobs.cluster import remote
from jobs.models import FineTuneRun, FineTuneShare, LLMSession, reaching
from portal import gate, shellsafe, ssh

COPY_TIMEOUT_S = 1800  # the whole copy: 4 GiB (the default limit) at a few MB/s between two homes through the portal


class CopyRefused(Exception):
    """The adapter cannot be copied (the grant is gone, the adapter is gone or too large, its files are not plain);
    trying again changes nothing. The message says why, for the session's reason."""


def needs_copy(run: FineTuneRun, account: ClusterAccount) -> bool:
    """Whether a session submitted through this account reads the run's adapter from a copy: the run trained as
    another cluster user of the same cluster (on another cluster it cannot load it at all: the launch says so)."""
    return run.cluster_id == account.cluster_id and run.account.username != account.username


def copied_adapters(session: LLMSession) -> list[FineTuneRun]:
    """The session's adapters that its job reads from a copy in its own cluster user's home, in the adapters' order."""
    runs = session.adapters.select_related("account", "cluster", "owner").order_by("pk")
    return [run for run in runs if needs_copy(run, session.account)]


def copy_adapters(session: LLMSession) -> list[str]:
    """Copy each adapter the session reads from a copy (copied_adapters) into its account's home; the runs' uuids.
    Raises CopyRefused, or ssh.SSHError for what may pass (the submit tries again)."""
    runs = copied_adapters(session)
    for run in runs:
        copy_adapter(run, session)
    return [str(run.pk) for run in runs]


def copy_adapter(run: FineTuneRun, session: LLMSession) -> str:
    """One adapter into the session account's home: "present" when the copy there is already this adapter, else
    "copied".

    1. The grant again, now: the session's owner is the run's owner, or a grant in force reaches them (a revoked one
    copies nothing more). 2. The run's side sums the adapter's files (adapter-manifest): none, and it is gone; past
    PORTAL_ADAPTER_DOWNLOAD_MAX_BYTES, too large. 3. The session's side says what copy it holds (adapter-copied): the
    same checksum, and nothing is sent. 4. The archive streams from the run's account to the session's
    (adapter-bundle into adapter-receive), which unpacks it only if its files sum to the same checksum."""
    name, account = run.model_name, session.account
    if run.state != FineTuneRun.State.COMPLETED:
        raise CopyRefused(f"{name} is {run.state}: it has no adapter to copy")
    if run.owner_id != session.owner_id and not FineTuneShare.objects.filter(reaching(session.owner), run=run).exists():
        raise CopyRefused(f"{name} is no longer shared with {session.owner.username}: its adapter is not copied")
    if run.cluster_id != account.cluster_id:
        raise CopyRefused(f"{name}'s adapter is on {run.cluster.name}; a session on another cluster cannot load it")
    source, args = run.account, [str(run.pk)]
    listed = source.run(gate.command(remote.ADAPTER_MANIFEST, args, gated=source.restricted), timeout_s=300)
    size, checksum = _manifest(listed)
    if not checksum:
        raise CopyRefused(f"{name}'s adapter is no longer on the cluster")
    limit = settings.PORTAL_ADAPTER_DOWNLOAD_MAX_BYTES
    if size > limit:
        raise CopyRefused(
            f"{name}'s adapter is {size / 2**20:,.0f} MiB, more than the {limit / 2**20:,.0f} MiB the portal copies "
            "(PORTAL_ADAPTER_DOWNLOAD_MAX_BYTES)"
        )
    held = account.run(gate.command(remote.ADAPTER_COPIED, args, gated=account.restricted), timeout_s=60)
    if held.ok and held.stdout.strip() == checksum:
        return "present"
    max_kib = str(-(-limit // 1024))
    receive = gate.command(remote.ADAPTER_RECEIVE, [*args, checksum, max_kib], gated=account.restricted)
    bundle = gate.command(remote.ADAPTER_BUNDLE, args, gated=source.restricted)
    archive = ssh.pool.read(source.ssh_target(), bundle)
    chunks = _bounded(archive, limit)
    try:
        result = account.run(receive, stdin=chunks, timeout_s=COPY_TIMEOUT_S)
    finally:  # a copy refused halfway: the read of the run's side ends too
        chunks.close()
        if isinstance(archive, Generator):
            archive.close()
    if result.exit_code == remote.ADAPTER_COPY_REFUSED:
        raise CopyRefused(f"{name}: {_said(result)}")
    if not result.ok or result.stdout.strip() not in ("present", "copied"):
        raise ssh.SSHError(account.ssh_target(), f"copying {name}'s adapter failed: {_said(result)}")
    return result.stdout.strip()


def _manifest(result: ssh.CommandResult) -> tuple[int, str]:
    """adapter-manifest's answer, "BYTES SHA256" (the run's side: hostile input); (0, "") for no adapter. Its refusal
    (a link among the adapter's files) is CopyRefused."""
    if result.exit_code == remote.ADAPTER_COPY_REFUSED:
        raise CopyRefused(_said(result))
    if not result.ok:
        raise ssh.SSHError(None, f"the adapter's checksum could not be read: {_said(result)}")
    words = result.stdout.split()
    if len(words) != 2 or not (words[0].isascii() and words[0].isdigit()) or not shellsafe.SHA256.accepts(words[1]):
        return 0, ""
    return int(words[0]), words[1]


def _said(result: ssh.CommandResult) -> str:
    return (result.stderr.strip() or result.stdout.strip() or f"exit code {result.exit_code}")[-500:]


def _bounded(chunks: Iterator[bytes], limit: int) -> Generator[bytes, None, None]:
    """The archive as it comes, stopped past the limit (the files could grow after they were summed; the receiving
    side bounds what it unpacks anyway)."""
    sent = 0
    for chunk in chunks:
        sent += len(chunk)
        if sent > limit:
            raise CopyRefused("the adapter grew past the copy limit while it was sent")
        yield chunk
