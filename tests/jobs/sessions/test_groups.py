"""Portal groups that follow the cluster's groups and Slurm accounts: the commands, their output, and the sync's
rules (the SSH side is replaced here; tests/e2e/test_sharing.py reads a real group over the real sshd)."""

from __future__ import annotations

import os
import shlex
import subprocess
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.base import CommandError
from hypothesis import given
from hypothesis import strategies as st

from catalog.models import ClusterAccount
from jobs.models import GroupSource
from jobs.sessions import groups
from portal import ssh
from portal.slurm.cli import SlurmCli


def test_getent_and_sacctmgr_output_becomes_user_names() -> None:
    assert groups.parse_members("unix_group", "nlp:x:2001:ada,alan,grace\n") == {"ada", "alan", "grace"}
    assert groups.parse_members("unix_group", "nlp:x:2001:\n") == set()
    assert groups.parse_members("slurm_account", "\nada\nalan\n") == {"ada", "alan"}
    assert groups.parse_members("slurm_account", "ada\n$(rm -rf /)\n") == {"ada"}


@given(st.text(max_size=80))
def test_names_reach_the_shell_only_validated_and_quoted(name: str) -> None:
    for kind in ("unix_group", "slurm_account"):
        try:
            command = groups.lookup_command(kind, name)
        except ValueError:
            continue
        words = shlex.split(command)
        assert name in words or f"account={name}" in words  # one argument, whatever the name holds
        assert not set(name) - set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def test_sacctmgr_names_the_cluster_in_its_query(tmp_path: Path) -> None:
    """Run by bash with stand-ins for sacctmgr and getent that say how they were called."""
    for name in ("sacctmgr", "getent"):
        (tmp_path / name).write_text(f'#!/bin/sh\necho "{name} $*"\n')
        (tmp_path / name).chmod(0o755)

    def said(kind: str, cli: SlurmCli) -> str:
        command = groups.lookup_command(kind, "lab", cli)
        env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
        return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env).stdout.strip()

    query = "sacctmgr --noheader --parsable2 show associations account=lab"
    assert said(GroupSource.Kind.SLURM_ACCOUNT, SlurmCli("c2", str(tmp_path))) == f"{query} cluster=c2 format=User"
    assert said(GroupSource.Kind.SLURM_ACCOUNT, SlurmCli()) == f"{query} format=User"
    assert said(GroupSource.Kind.UNIX_GROUP, SlurmCli("c2")) == "getent group lab"


@pytest.fixture
def reader(account: ClusterAccount) -> ClusterAccount:
    """The cluster's service account, which reads its groups for the site."""
    return ClusterAccount.objects.create(cluster=account.cluster, kind="service", label="portal", username="portalsvc")


@pytest.fixture
def mapped(
    account: ClusterAccount, reader: ClusterAccount, owner: Any, other_user: Any, shared_user: Any, lab: Group
) -> GroupSource:
    for user, name in ((other_user, "grace"), (shared_user, "alan")):
        ClusterAccount.objects.create(cluster=account.cluster, user=user, username=name)
    return GroupSource.objects.create(group=lab, account=reader, name="nlp")


def answers(monkeypatch: pytest.MonkeyPatch, result: ssh.CommandResult | Exception) -> list[str]:
    """The login host answers every command with `result`; returns the users the commands ran as."""
    asked: list[str] = []

    def run(target: Any, command: str, **_: Any) -> ssh.CommandResult:
        asked.append(target.username)
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(ssh.pool, "run", run)
    return asked


def test_a_sync_sets_the_members_to_those_the_cluster_names(
    mapped: GroupSource, lab: Group, owner: Any, other_user: Any, shared_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers(monkeypatch, ssh.CommandResult(0, "nlp:x:2001:ada,grace,nobody-we-know\n", ""))
    result = groups.sync(lab)
    assert (result.added, result.removed, result.errors) == (["grace"], ["alan"], [])
    assert set(lab.user_set.all()) == {owner, other_user}
    mapped.refresh_from_db()
    assert mapped.members_found == 2 and mapped.synced_at is not None and mapped.last_error == ""


@pytest.mark.parametrize(
    "failure",
    [ssh.CommandResult(2, "", ""), ssh.SSHUnavailable(None, "connection refused")],
)
def test_a_source_that_cannot_be_read_changes_nothing_and_says_why(
    mapped: GroupSource, lab: Group, owner: Any, shared_user: Any, monkeypatch: pytest.MonkeyPatch, failure: Any
) -> None:
    answers(monkeypatch, failure)
    result = groups.sync(lab)
    assert result.errors and set(lab.user_set.all()) == {owner, shared_user}
    mapped.refresh_from_db()
    assert mapped.last_error


def test_an_unknown_slurm_account_is_an_error_not_an_empty_group(
    mapped: GroupSource, lab: Group, owner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    GroupSource.objects.filter(pk=mapped.pk).update(kind="slurm_account")
    answers(monkeypatch, ssh.CommandResult(0, "", ""))
    assert groups.sync(lab).errors and owner in lab.user_set.all()


def test_beat_syncs_the_mapped_groups(mapped: GroupSource, lab: Group, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.tasks import sync_groups

    answers(monkeypatch, ssh.CommandResult(0, "nlp:x:2001:alan\n", ""))
    assert sync_groups.apply().get() == 1
    assert [u.get_username() for u in lab.user_set.all()] == ["alan"]


def test_a_researchers_own_account_never_reads_a_group_for_the_site(
    mapped: GroupSource, account: ClusterAccount, lab: Group, owner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ada's shell could print "nlp:x:2001:ada" for any group, Session support's included: her account is not asked.
    GroupSource.objects.filter(pk=mapped.pk).update(account=account)
    lab.user_set.remove(owner)
    asked = answers(monkeypatch, ssh.CommandResult(0, "nlp:x:2001:ada\n", ""))
    result = groups.sync(lab)
    assert asked == [] and owner not in lab.user_set.all()
    assert result.errors and "researcher's own account" in result.errors[0]
    mapped.refresh_from_db()
    assert "service account or one an admin marked trusted" in mapped.last_error


def test_an_account_an_admin_marked_trusted_reads_groups_like_a_service_account(
    mapped: GroupSource, account: ClusterAccount, lab: Group, owner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ClusterAccount.objects.filter(pk=account.pk).update(trusted=True)
    GroupSource.objects.filter(pk=mapped.pk).update(account=account)
    lab.user_set.remove(owner)
    asked = answers(monkeypatch, ssh.CommandResult(0, "nlp:x:2001:ada\n", ""))
    assert groups.sync(lab).added == ["ada"] and asked == ["ada"]


def test_mapping_a_group_through_a_researchers_account_is_refused(
    account: ClusterAccount, reader: ClusterAccount
) -> None:
    with pytest.raises(CommandError, match="researcher's own account"):
        call_command("groups", "map", "nlp-lab", "--account", str(account.pk), "--unix-group", "nlp", stdout=StringIO())
    assert not GroupSource.objects.exists()
    call_command("groups", "map", "nlp-lab", "--account", str(reader.pk), "--unix-group", "nlp", stdout=StringIO())
    assert GroupSource.objects.get().account == reader
