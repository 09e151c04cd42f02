"""A cluster's status account lists every portal job in one command; accounts it cannot settle poll on their own."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from catalog.models import Cluster, ClusterAccount
from jobs import tasks
from jobs.cluster import remote
from jobs.models import LLMSession, State, transition
from jobs.sessions import listing, queue_order
from jobs.sessions.actions import launch
from portal import ssh
from tests.conftest import LAUNCH
from tests.jobs.cluster.framing import framed


@pytest.fixture
def other_account(account: ClusterAccount, other_user: Any) -> ClusterAccount:
    other = ClusterAccount(cluster=account.cluster, user=other_user, username="grace")
    other.save()
    return other


@pytest.fixture
def status(account: ClusterAccount, django_user_model: Any) -> ClusterAccount:
    """The cluster's status account: a service account of its own."""
    operator = ClusterAccount(cluster=account.cluster, kind="service", username="portalmon")
    operator.save()
    Cluster.objects.filter(pk=account.cluster_id).update(status_account=operator)
    return operator


def queued(user: Any, job_id: str, django_capture_on_commit_callbacks: Any) -> LLMSession:
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(user, LAUNCH)
    transition(session.pk, State.QUEUED, cause="test", job_id=job_id)
    return LLMSession.objects.get(pk=session.pk)


def line(owner: str, session: LLMSession, state: str = "PENDING", reason: str = "Priority", place: str = "1") -> str:
    nodes = "node1" if state == "RUNNING" else ""
    fields = [session.job_id, f"hpcllm-{session.pk}", state, reason, "2026-12-07T10:00:00", nodes, "0:00", "5:00"]
    return "|".join([owner, *fields, "gpu", "1", place if state == "PENDING" else ""])


class LoginHost:
    """The login host as the status account and the researchers' accounts see it: every command is recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, lines: list[str], rc: int = 0) -> None:
        self.lines, self.rc = lines, rc
        self.commands: list[tuple[str, str]] = []
        monkeypatch.setattr(ssh.pool, "run", self.run)

    def run(self, target: ssh.SSHTarget, command: str, **kwargs: Any) -> ssh.CommandResult:
        self.commands.append((target.username, command))
        if "section listing" in command:
            answer = f"@@listing {self.rc}\n" + "\n".join(self.lines) + "\n@@end"
            return ssh.CommandResult(0, framed(kwargs.get("stdin"), answer), "")
        return ssh.CommandResult(0, framed(kwargs.get("stdin"), "@@squeue 0\n@@order\n@@end"), "")


@pytest.fixture
def sessions(
    owner: Any, other_user: Any, other_account: ClusterAccount, django_capture_on_commit_callbacks: Any
) -> tuple[LLMSession, LLMSession]:
    return queued(owner, "101", django_capture_on_commit_callbacks), queued(
        other_user, "202", django_capture_on_commit_callbacks
    )


def test_one_listing_settles_every_account_whose_jobs_wait(
    status: ClusterAccount, sessions: tuple[LLMSession, LLMSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    ada, grace = sessions
    cluster = LoginHost(monkeypatch, [line("ada", ada, reason="Resources", place="2"), line("grace", grace)])
    cycle = listing.cycle(ada.cluster_id)
    assert cycle == listing.Cycle(own=[], settled=2, changed=2)
    assert [user for user, _ in cluster.commands] == ["portalmon"]
    ada.refresh_from_db()
    grace.refresh_from_db()
    assert (ada.slurm_reason, ada.queue_position, ada.last_seen_at is not None) == ("Resources", 2, True)
    assert (grace.slurm_reason, grace.queue_position) == ("Priority", 1)
    assert ada.estimated_start == timezone.make_aware(datetime(2026, 12, 7, 10, 0))
    # The places serve the accounts' own polls too: none reads the queue again this cycle.
    assert queue_order.to_read(ada.cluster_id, ["101"]) == queue_order.NONE
    again = listing.cycle(ada.cluster_id)
    assert again == listing.Cycle(own=[], settled=2, changed=0)  # nothing written when nothing changed


@pytest.mark.parametrize(
    "case",
    ["running", "not listed", "someone else's job", "another session's name", "cancel asked", "was serving"],
)
def test_an_account_the_listing_cannot_settle_polls_on_its_own(
    case: str, status: ClusterAccount, sessions: tuple[LLMSession, LLMSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    ada, grace = sessions
    ada_line = {
        "running": line("ada", ada, state="RUNNING", reason="None"),
        "someone else's job": line("grace", ada),
        "another session's name": line("ada", ada).replace(str(ada.pk), str(grace.pk)),
    }.get(case, line("ada", ada))
    lines = [line("grace", grace)] + ([] if case == "not listed" else [ada_line])
    if case == "cancel asked":
        LLMSession.objects.filter(pk=ada.pk).update(cancel_requested_at=timezone.now())
    if case == "was serving":
        LLMSession.objects.filter(pk=ada.pk).update(host="127.0.0.5")
    LoginHost(monkeypatch, lines)
    cycle = listing.cycle(ada.cluster_id)
    assert cycle.own == [ada.account_id] and cycle.settled == 1
    ada.refresh_from_db()
    assert ada.slurm_reason == "" and ada.state == State.QUEUED  # left as it was for its own poll


def test_a_failed_listing_leaves_every_account_to_its_own_poll(
    status: ClusterAccount, sessions: tuple[LLMSession, LLMSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    ada, grace = sessions
    LoginHost(monkeypatch, ["slurm_load_jobs error: Unable to contact slurm controller"], rc=1)
    assert listing.cycle(ada.cluster_id) == listing.Cycle(own=sorted([ada.account_id, grace.account_id]), settled=0,
                                                          changed=0)  # fmt: skip

    def refuse(*args: Any, **kwargs: Any) -> ssh.CommandResult:
        raise ssh.ConnectionRefused(None, "connection refused")

    monkeypatch.setattr(ssh.pool, "run", refuse)
    assert len(listing.cycle(ada.cluster_id).own) == 2
    assert LLMSession.objects.filter(state=State.QUEUED, slurm_reason="").count() == 2  # nothing ended or changed


def test_without_a_status_account_each_account_polls_on_its_own(
    sessions: tuple[LLMSession, LLMSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    ada, grace = sessions
    assert listing.plan() == listing.Plan(clusters=[], accounts=sorted([ada.account_id, grace.account_id]))
    cluster = LoginHost(monkeypatch, [])
    assert listing.cycle(ada.cluster_id).own == sorted([ada.account_id, grace.account_id])
    assert cluster.commands == []


def test_the_beat_lists_a_cluster_with_a_status_account_and_polls_the_accounts_it_cannot_settle(
    status: ClusterAccount, sessions: tuple[LLMSession, LLMSession], monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    settings.CELERY_TASK_ALWAYS_EAGER = True
    ada, grace = sessions
    assert listing.plan() == listing.Plan(clusters=[ada.cluster_id], accounts=[])
    cluster = LoginHost(monkeypatch, [line("grace", grace)])  # ada's job is gone: her own poll asks sacct
    tasks.poll_clusters()
    assert [user for user, _ in cluster.commands] == ["portalmon", "ada"]


def test_a_researchers_own_account_is_never_used_as_the_status_account(
    account: ClusterAccount, sessions: tuple[LLMSession, LLMSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    # ada's shell could print any listing: every other user's waiting jobs would be settled from it.
    ada, grace = sessions
    Cluster.objects.filter(pk=account.cluster_id).update(status_account=account)
    assert listing.plan() == listing.Plan(clusters=[], accounts=sorted([ada.account_id, grace.account_id]))
    cluster = LoginHost(monkeypatch, [line("grace", grace, reason="Forged")])
    assert listing.cycle(ada.cluster_id) == listing.Cycle(sorted([ada.account_id, grace.account_id]), 0, 0)
    assert cluster.commands == [] and not LLMSession.objects.filter(slurm_reason="Forged").exists()
    with pytest.raises(ValidationError, match="researcher's own account"):
        Cluster.objects.get(pk=account.cluster_id).full_clean()

    ClusterAccount.objects.filter(pk=account.pk).update(trusted=True)  # an admin vouches for it
    assert listing.plan() == listing.Plan(clusters=[ada.cluster_id], accounts=[])
    assert listing.cycle(ada.cluster_id).settled == 1 and cluster.commands[0][0] == "ada"


def test_the_status_account_must_be_on_the_cluster(account: ClusterAccount, example_catalog: Any) -> None:
    elsewhere = Cluster.objects.exclude(pk=account.cluster_id).first()
    assert elsewhere is not None
    elsewhere.status_account = account
    with pytest.raises(ValidationError, match="account on this cluster"):
        elsewhere.full_clean()


def test_a_listing_is_read_as_the_status_account_printed_it() -> None:
    frame = remote.Framed("listing").frame
    text = (
        "@@listing 0\nCLUSTER: hpc1\n"
        "ada|101|hpcllm-x|PENDING|Priority|N/A||0:00|5:00|gpu|1|3\n"
        "grace|102|hpcllm-y|RUNNING|None|2026-12-07T10:00:00|node1|1:00|4:00|gpu|1|\n"
        "CLUSTER: hpc1\n"
        "garbage line\n@@end\n"
    )
    parsed = remote.parse_listing(framed(f"{frame}\n".encode(), text), frame)
    assert parsed.ok and set(parsed.jobs) == {"101", "102"}
    assert parsed.jobs["101"][0] == "ada" and parsed.places == {"101": 3}
    assert parsed.jobs["102"][1].node_list == "node1"
    failed = remote.parse_listing(
        framed(f"{frame}\n".encode(), "@@listing 1\nslurm_load_jobs error: Socket timed out\n@@end\n"), frame
    )
    assert not failed.ok and "Socket timed out" in failed.error
    cut = remote.parse_listing(
        framed(f"{frame}\n".encode(), "@@listing 0\nada|101|hpcllm-x|PENDING|Priority|N/A||0:00|5:00|gpu|1|3\n"), frame
    )
    assert not cut.ok and cut.error == "the listing was cut short"
    assert not remote.parse_listing(text, frame).ok  # the same lines without the frame are not the listing's
