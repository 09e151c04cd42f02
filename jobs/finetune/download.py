"""A fine-tune run's adapter as its owner downloads it from the run's page: the adapter directory on the cluster,
sized first (refused past PORTAL_ADAPTER_DOWNLOAD_MAX_BYTES), then archived there (tar, gzip) and streamed as it comes,
over the run's own account (a restricted key's gate runs the two commands by name)."""

from __future__ import annotations

from collections.abc import Iterator

from django.conf import settings

from jobs.cluster import remote
from jobs.models import FineTuneRun
from portal import gate, ssh


class NoAdapter(Exception):
    """The run has no adapter to download (yet, or any more); the message says why."""


def adapter_archive(run: FineTuneRun) -> Iterator[bytes]:
    """The run's adapter directory as a .tar.gz, streamed from the cluster. Raises NoAdapter, or ssh.SSHError when
    the cluster cannot be asked; the stream stops at the size limit (the directory could grow after it was sized)."""
    if run.state != FineTuneRun.State.COMPLETED:
        raise NoAdapter(f"the run has {'not ' if not run.is_ended else ''}ended without an adapter")
    account, args = run.account, [str(run.pk)]
    sized = account.run(gate.command(remote.ADAPTER_SIZE, args, gated=account.restricted), timeout_s=30)
    kib = sized.stdout.strip()
    if not kib.isdigit():
        raise NoAdapter("its adapter is no longer on the cluster")
    limit = settings.PORTAL_ADAPTER_DOWNLOAD_MAX_BYTES
    if int(kib) * 1024 > limit:
        raise NoAdapter(f"its adapter is {int(kib) / 1024:,.0f} MiB, more than the {limit / 2**20:,.0f} MiB the "
                        "portal downloads; copy it from the cluster")  # fmt: skip
    return _bounded(ssh.pool.read(account.ssh_target(), gate.command(remote.ADAPTER, args, gated=account.restricted)))


def _bounded(chunks: Iterator[bytes]) -> Iterator[bytes]:
    sent = 0
    for chunk in chunks:
        sent += len(chunk)
        if sent > settings.PORTAL_ADAPTER_DOWNLOAD_MAX_BYTES:
            raise ssh.SSHError(None, "the adapter grew past the download limit while it was sent")
        yield chunk
