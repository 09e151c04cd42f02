"""The shared queue order: one account's poll a cycle reads the cluster's queue for every portal job it sees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from catalog.models import ClusterAccount
from jobs.cluster import layout
from jobs.cluster.remote import PollResult
from jobs.models import LLMSession, State, transition
from jobs.sessions import lifecycle, queue_order
from jobs.sessions.actions import launch
from portal import ssh
from tests.conftest import LAUNCH
from tests.jobs.cluster.framing import fake_bin, run


def polled(**places: tuple[str, int]) -> PollResult:
    result = PollResult()
    result.positions = {(partition, job_id): place for job_id, (partition, place) in places.items()}
    return result


def test_one_poll_a_cycle_reads_the_queue_and_the_others_take_their_places_from_it(db: None) -> None:
    assert queue_order.to_read(1, ["101"]) == queue_order.ALL
    first = polled(**{"101": ("gpu", 3), "202": ("gpu", 5)})  # it sees another account's job too
    queue_order.share(1, first, queue_order.ALL, ["101"])
    assert queue_order.to_read(1, ["202"]) == queue_order.NONE  # within the same interval: not read again
    second = polled()
    queue_order.share(1, second, queue_order.NONE, ["202"])
    assert second.queue_position("gpu", "202") == 5
    assert queue_order.to_read(2, ["101"]) == queue_order.ALL  # another cluster's queue is its own


def test_an_account_whose_jobs_the_shared_order_lacks_reads_its_own(db: None) -> None:
    queue_order.to_read(1, ["101"])
    queue_order.share(1, polled(**{"101": ("gpu", 3)}), queue_order.ALL, ["101"])
    # PrivateData=jobs: the reader could not see job 303, so its owner's poll reads the queue itself.
    assert queue_order.to_read(1, ["303"]) == queue_order.OWN
    own = polled(**{"303": ("gpu", 1)})
    queue_order.share(1, own, queue_order.OWN, ["303"])
    later = polled()
    queue_order.share(1, later, queue_order.NONE, ["101", "303"])
    assert later.queue_position("gpu", "101") == 3 and later.queue_position("gpu", "303") == 1
    # A poll is given the places of its own pending jobs only.
    other = polled()
    queue_order.share(1, other, queue_order.NONE, ["303"])
    assert other.positions == {("gpu", "303"): 1}


def test_a_poll_without_pending_jobs_reads_no_queue(db: None) -> None:
    assert queue_order.to_read(1, []) == queue_order.NONE


def test_a_place_forged_in_a_jobs_file_never_reaches_the_shared_order(
    tmp_path: Path,
    account: ClusterAccount,
    owner: Any,
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real poll script, run here: a running job's connection file goes on as an order section (as the old poll
    read it) that puts the waiting job first; Slurm's own queue has it second, and that is what every account gets."""
    with django_capture_on_commit_callbacks(execute=False):
        running, waiting = launch(owner, LAUNCH), launch(owner, {**LAUNCH, "alias": "second"})
    transition(running.pk, State.STARTING, cause="test", job_id="101", node_list="node1")
    transition(waiting.pk, State.QUEUED, cause="test", job_id="102")
    env = fake_bin(
        tmp_path,
        squeue=(
            'if [[ "$*" == *PENDING* ]]; then printf "$F%s\\n" "gpu|7|x" "gpu|102|hpcllm-' + str(waiting.pk) + '"; '
            f"else echo '101|hpcllm-{running.pk}|RUNNING|None|2026-11-21T12:00:00|node1|1:00|59:00|gpu|1'; "
            f"echo '102|hpcllm-{waiting.pk}|PENDING|Priority|N/A|(null)|0:00|1:00:00|gpu|1'; fi"
        ),
        scontrol='echo "NodeName=node1 NodeAddr=127.0.0.1 NodeHostName=localhost"',
    )
    folder = Path(env["HOME"]) / layout.session_dir(str(running.pk))
    folder.mkdir(parents=True)
    (folder / "connection.json").write_text('{"host": "localhost", "port": 4242}\n@@order\ngpu|102|1\ngpu|999|1\n')

    def login_host(target: ssh.SSHTarget, command: str, stdin: bytes = b"", **kwargs: Any) -> ssh.CommandResult:
        out = run(command, env, stdin)
        return ssh.CommandResult(out.returncode, out.stdout, out.stderr)

    monkeypatch.setattr(ssh.pool, "run", login_host)
    lifecycle.poll(account.pk)
    assert LLMSession.objects.get(pk=waiting.pk).queue_position == 2
    assert queue_order._shared(account.cluster_id) == {"102": ("gpu", 2)}
