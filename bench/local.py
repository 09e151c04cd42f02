"""What the benchmarks that drive the local cluster share: its account in a scratch database, and an SSH pool that
counts commands. Import after django.setup()."""

from __future__ import annotations

import os
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management import call_command

from catalog.models import Cluster, ClusterAccount
from catalog.yaml_io import import_file
from portal import ssh

REPO = Path(__file__).resolve().parent.parent
CLUSTER_DIR = Path(os.environ.get("LOCAL_CLUSTER_DIR", REPO / "var" / "local-cluster"))


class CountingPool(ssh.SSHPool):
    def __init__(self) -> None:
        super().__init__()
        self.commands = 0

    def run(self, target: ssh.SSHTarget, command: str, **kwargs: object) -> ssh.CommandResult:
        self.commands += 1
        return super().run(target, command, **kwargs)  # type: ignore[arg-type]


def setup() -> ClusterAccount:
    """Migrate the scratch database, import the local cluster's catalog, and give a user its account there."""
    call_command("migrate", verbosity=0)
    import_file(str(CLUSTER_DIR / "catalog.yaml"))
    user = get_user_model().objects.create_user("bench")
    account = ClusterAccount(cluster=Cluster.objects.get(slug="local"), user=user, kind="personal", username="llmuser")
    account.set_private_key((CLUSTER_DIR / "id_ed25519").read_text())
    account.save()
    return account
