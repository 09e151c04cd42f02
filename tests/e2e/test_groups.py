"""A portal group that follows a Unix group on the local cluster, read with getent over the real, pinned sshd."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.base import CommandError

from jobs.models import GroupSource
from portal import ssh
from tests.e2e.sessions import local_account, local_service_account

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]


@pytest.fixture
def unix_group(local_cluster: dict[str, Any]) -> Iterator[str]:
    """A Unix group on the cluster's login host (this host), with the cluster's user in it."""
    name = f"hpcllm-lab-{uuid.uuid4().hex[:6]}"
    subprocess.run(["groupadd", name], check=True)
    subprocess.run(["gpasswd", "-a", local_cluster["user"], name], check=True, capture_output=True)
    yield name
    subprocess.run(["groupdel", name], check=False)
    ssh.pool.close_all()


def test_a_group_follows_the_clusters_unix_group(
    local_catalog: dict[str, Any], local_cluster: dict[str, Any], owner: Any, other_user: Any, unix_group: str
) -> None:
    own = local_account(owner, local_catalog)  # what names cluster users as portal users
    out = StringIO()
    with pytest.raises(CommandError, match="researcher's own account"):  # its shell could print any members
        call_command("groups", "map", "nlp-lab", "--account", str(own.pk), "--unix-group", unix_group, stdout=out)
    account = local_service_account(local_catalog)
    call_command("groups", "map", "nlp-lab", "--account", str(account.pk), "--unix-group", unix_group, stdout=out)
    lab = Group.objects.get(name="nlp-lab")
    lab.user_set.add(other_user)  # added by hand: a mapped group is the cluster's to say
    call_command("groups", "sync", stdout=out)
    assert set(lab.user_set.all()) == {owner}
    assert "nlp-lab: +1 ada -1 grace" in out.getvalue()
    source = GroupSource.objects.get()
    assert source.members_found == 1 and source.last_error == "" and source.synced_at is not None

    subprocess.run(["gpasswd", "-d", local_cluster["user"], unix_group], check=True, capture_output=True)
    call_command("groups", "sync", "nlp-lab", stdout=out)
    assert not lab.user_set.exists()

    GroupSource.objects.filter(pk=source.pk).update(name="no-such-group-here")
    lab.user_set.add(owner)
    with pytest.raises(CommandError, match="could not be read"):
        call_command("groups", "sync", stdout=out, stderr=StringIO())
    assert set(lab.user_set.all()) == {owner}  # a source that fails empties nothing
    assert "no-such-group-here" in GroupSource.objects.get().last_error
