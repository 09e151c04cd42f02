"""The owner's own shell forges where their job's node is; the cluster's compute-node networks still decide.

The poll runs as the session owner's cluster account, and bash reads that account's ~/.bashrc before every command
sshd hands it: its user can make `scontrol show node` say anything. Every address here is this machine's.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from catalog.models import Cluster, ClusterAccount
from jobs.cluster import layout
from jobs.models import State
from tests.e2e.sessions import drive, shell, start
from tests.e2e.test_sessions import Listener, proxy_replies

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]

# Prepended to the cluster user's ~/.bashrc (Debian's returns at once for a shell that is not interactive, and sshd's
# bash reads it before each command): every scontrol the account runs, the poll's included, gives every node the
# address 127.0.0.2. Exported, so the bash that runs the poll's script has it too.
FORGED_SCONTROL = """# tests/e2e/test_node_networks.py: a forged scontrol
scontrol() {
  local out rc
  out=$(command scontrol "$@" 2>&1); rc=$?
  printf '%s\\n' "$out" | sed -e 's/NodeAddr=[^ ]*/NodeAddr=127.0.0.2/g'
  return $rc
}
export -f scontrol
"""


def write_home_file(local: dict[str, Any], name: str, text: str | None) -> None:
    """Write (or, for None, remove) a file in the cluster user's home, as that user."""
    if text is None:
        assert shell(local, f"rm -f ~/{name}").exit_code == 0
        return
    encoded = base64.b64encode(text.encode()).decode()
    assert shell(local, f"echo {encoded} | base64 -d >~/{name}.new && mv -f ~/{name}.new ~/{name}").exit_code == 0


@pytest.mark.django_db(transaction=True)  # the proxy looks sessions up on its own threads
def test_a_node_address_forged_in_the_owners_bashrc_gets_nothing_outside_the_clusters_networks(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    """Slurm's answer about the job's node (NodeAddr=127.0.0.2, through the owner's wrapped scontrol) and the job's
    connection.json agree, so the job's-own-nodes check passes; the cluster's networks (127.0.0.1/32: its nodes'
    real address) do not hold 127.0.0.2, and a listener there hears nothing."""
    Cluster.objects.filter(slug="local").update(node_networks="127.0.0.1/32")
    session = drive(start(owner, django_capture_on_commit_callbacks), lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING and session.host == "127.0.0.1", session.end_reason
    assert session.port is not None
    elsewhere = Listener("127.0.0.2", session.port)
    connection = f"~/{layout.session_dir(str(session.pk))}/connection.json"
    listed = shell(local_catalog, "cat ~/.bashrc 2>/dev/null && echo :present || echo :absent")
    bashrc = listed.stdout.removesuffix(":present\n") if listed.stdout.endswith(":present\n") else None
    try:
        write_home_file(local_catalog, ".bashrc", FORGED_SCONTROL + (bashrc or ""))
        nodes = shell(local_catalog, f"scontrol -o show node {session.node_list}").stdout
        assert "NodeAddr=127.0.0.2" in nodes  # the forgery is in force for whatever the account runs
        rewrite = 's/"host": "[^"]*"/"host": "127.0.0.2"/'
        shell(local_catalog, f"cp {connection} {connection}.real && sed -i '{rewrite}' {connection}")
        session = drive(session, lambda s: s.host != "127.0.0.1" or s.state != State.RUNNING, timeout_s=60)
        replies = proxy_replies(session, owner)
        assert elsewhere.heard == []
        assert session.state == State.STARTING and not session.serving and replies == [409, 409]
        refusals = [e.cause for e in session.events.all() if "127.0.0.2" in e.cause]
        assert refusals == [
            "refused the address '127.0.0.2' the job reported: 127.0.0.2 is outside the cluster's compute-node "
            "networks (127.0.0.1/32)"
        ]
    finally:
        elsewhere.close()
        write_home_file(local_catalog, ".bashrc", bashrc)
    assert "NodeAddr=127.0.0.1" in shell(local_catalog, f"scontrol -o show node {session.node_list}").stdout

    shell(local_catalog, f"mv -f {connection}.real {connection}")
    session = drive(session, lambda s: s.state == State.RUNNING or s.is_ended)
    assert (session.state, session.host) == (State.RUNNING, "127.0.0.1")
    assert proxy_replies(session, owner) == [200, 200] and elsewhere.heard == []
