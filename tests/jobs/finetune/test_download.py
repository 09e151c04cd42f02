"""A run's adapter downloaded from its page: the cluster's two commands (sized, then archived) run for real against a
directory laid out as the trainer leaves it, and the page streams the archive as an attachment to the run's owner
and those they shared it with, refusing one that is not there or too large."""

from __future__ import annotations

import io
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs.cluster import layout, remote
from jobs.models import FineTuneRun, FineTuneShare, transition_finetune
from portal import gate, ssh

Start = Callable[..., FineTuneRun]


def on_cluster(home: Path, verb: gate.Verb, run: FineTuneRun) -> subprocess.CompletedProcess[bytes]:
    """The verb's script as a plain key runs it, in a home of its own."""
    script = gate.command(verb, [str(run.pk)])
    return subprocess.run(["bash", "-c", script], env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
                          capture_output=True, check=False)  # fmt: skip


@pytest.fixture
def done(start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FineTuneRun:
    """A completed run whose adapter directory is in a home under tmp_path, which the account's commands reach."""
    run = start(suffix="toy")
    transition_finetune(run.pk, FineTuneRun.State.COMPLETED, reason="trained", allowed_from=[FineTuneRun.State.QUEUED])
    adapter = tmp_path / layout.session_file(str(run.pk), layout.NAMES.adapter_dir)
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 5000)

    def run_here(account: ClusterAccount, command: str, **options: Any) -> ssh.CommandResult:
        done = subprocess.run(["bash", "-c", command], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, check=False)  # fmt: skip
        return ssh.CommandResult(done.returncode, done.stdout, done.stderr)

    def read_here(target: Any, command: str, **options: Any) -> Iterator[bytes]:
        done = subprocess.run(["bash", "-c", command], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                              capture_output=True, check=True)  # fmt: skip
        yield done.stdout

    monkeypatch.setattr(ClusterAccount, "run", run_here)
    monkeypatch.setattr(ssh.pool, "read", read_here)
    return FineTuneRun.objects.get(pk=run.pk)


def test_the_commands_size_the_adapter_and_archive_its_directory(done: FineTuneRun, tmp_path: Path) -> None:
    assert int(on_cluster(tmp_path, remote.ADAPTER_SIZE, done).stdout) >= 5
    archive = on_cluster(tmp_path, remote.ADAPTER, done)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["adapter", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    assert on_cluster(tmp_path / "elsewhere", remote.ADAPTER_SIZE, done).stdout == b""  # none there: nothing said


def test_the_owner_downloads_the_adapter_as_an_attachment(done: FineTuneRun, client: Client, owner: Any) -> None:
    client.force_login(owner)
    assert "Download the adapter" in client.get(f"/finetune/{done.pk}/").content.decode()
    reply = client.get(f"/finetune/{done.pk}/adapter.tar.gz")
    assert reply.status_code == 200 and reply["Content-Type"] == "application/gzip"
    assert reply["Content-Disposition"] == f'attachment; filename="tiny-llama-toy-{str(done.pk)[:8]}.tar.gz"'
    with tarfile.open(fileobj=io.BytesIO(reply.getvalue()), mode="r:gz") as tar:
        assert "adapter/adapter_model.safetensors" in tar.getnames()


def test_nobody_else_downloads_it_not_even_support_staff(
    done: FineTuneRun, client: Client, other_user: Any, support_user: Any
) -> None:
    for user in (other_user, support_user):
        client.force_login(user)
        assert client.get(f"/finetune/{done.pk}/adapter.tar.gz").status_code == 404
    client.logout()
    assert client.get(f"/finetune/{done.pk}/adapter.tar.gz").status_code == 302  # to sign in


def test_an_adapter_that_is_not_there_or_too_large_is_refused_with_why(
    done: FineTuneRun, start: Start, client: Client, owner: Any, settings: Any, tmp_path: Path
) -> None:
    client.force_login(owner)
    settings.PORTAL_ADAPTER_DOWNLOAD_MAX_BYTES = 2048
    reply = client.get(f"/finetune/{done.pk}/adapter.tar.gz")
    assert reply.status_code == 409 and "copy it from the cluster" in reply.content.decode()
    queued = start()
    reply = client.get(f"/finetune/{queued.pk}/adapter.tar.gz")
    assert reply.status_code == 409 and "not ended" in reply.content.decode()
    assert "Download the adapter" not in client.get(f"/finetune/{queued.pk}/").content.decode()


def test_those_it_is_shared_with_download_it_until_the_grant_ends(
    done: FineTuneRun, client: Client, owner: Any, shared_user: Any
) -> None:
    grant = FineTuneShare.objects.create(run=done, user=shared_user, created_by=owner)
    client.force_login(shared_user)
    assert "Download the adapter" in client.get(f"/finetune/{done.pk}/").content.decode()
    reply = client.get(f"/finetune/{done.pk}/adapter.tar.gz")
    assert reply.status_code == 200 and reply["Content-Type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(reply.getvalue()), mode="r:gz") as tar:
        assert "adapter/adapter_model.safetensors" in tar.getnames()
    FineTuneShare.objects.filter(pk=grant.pk).update(revoked_at=timezone.now())
    assert client.get(f"/finetune/{done.pk}/adapter.tar.gz").status_code == 404
