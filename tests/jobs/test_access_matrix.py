"""Who reaches what: every route that names something of someone's (a session, a conversation, a batch run, a grant,
a cluster account, a fine-tune run) and every route of the API (/api/v1/), for every role: anonymous, the owner,
another user, the user the session is shared with under a chat grant, an API grant, a grant that expired and one that
was revoked, staff without the support permission, and support staff.

The routes come from the URL configuration: a route that is not in the matrix fails
test_every_route_that_names_something_or_serves_the_api_is_in_the_matrix until its row says who reaches it. Pages
are asked through Django's test client; the door's routes (jobs/use/guard.py: /api/v1/ and /sessions/<uuid>/v1/)
through the ASGI application as uvicorn serves it (tests/asgi.py), which needs committed rows. The browser's routes
to /sessions/<uuid>/v1/ and /services/<name>/v1/ are the door's too."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.shortcuts import resolve_url
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, resolve
from django.utils import timezone

from catalog.models import ClusterAccount, ClusterRuntime
from catalog.runtime_rules import API_ROUTES
from jobs.batch import actions, staging
from jobs.cluster import login
from jobs.models import (
    ApiToken,
    BatchFile,
    BatchRun,
    Conversation,
    FineTuneComparison,
    FineTuneRun,
    LLMSession,
    SessionShare,
    State,
    transition,
)
from jobs.services import actions as services
from jobs.use import guard
from tests.asgi import Portal, bearer, browser
from tests.conftest import LAUNCH
from tests.jobs.batch.test_progress import batch_form

ROLES = ["anonymous", "owner", "other_user", "chat_grant", "api_grant", "expired", "revoked", "staff_user",
         "support_user"]  # fmt: skip
SERVICE = "lab-service"  # the owner's model service, for members of the lab
GRANTEE = "alan"  # one user, under a grant of each kind in turn (chat_grant, api_grant, expired, revoked)

OWNER = frozenset({"owner"})
OWNER_AND_SUPPORT = frozenset({"owner", "support_user"})
CHATTERS = frozenset({"owner", "support_user", "chat_grant"})
# The lab's members: the owner and alan, whatever his grants of the session. Support staff see the service's page but
# chat only with what they may use, as its proxy route lets them.
MEMBERS = frozenset({"owner", "chat_grant", "api_grant", "expired", "revoked"})
ALAN = MEMBERS - OWNER

# Who reaches each page that names something, by route name. Those a session is shared with reach its chat, never
# its page, log, grants, batch runs or controls; support staff reach what the owner does, but share nothing on.
PAGES: dict[str, frozenset[str]] = {
    "session": OWNER_AND_SUPPORT,
    "card": OWNER_AND_SUPPORT,
    "relaunch": OWNER_AND_SUPPORT,
    "log": OWNER_AND_SUPPORT,
    "share": OWNER,
    "unshare": OWNER,
    "cancel": OWNER_AND_SUPPORT,
    "delete": OWNER_AND_SUPPORT,
    "chat": CHATTERS,
    "chat-new": CHATTERS,
    "batch": OWNER_AND_SUPPORT,
    "batch-output": OWNER_AND_SUPPORT,
    "batch-stop": OWNER_AND_SUPPORT,
    "session-batch-new": OWNER_AND_SUPPORT,
    # A fine-tune run: its owner's (and support staff's); a session's grants share none of it (the run's own grants
    # do, for a completed run: tests/jobs/finetune/test_sharing.py).
    "finetune": OWNER_AND_SUPPORT,
    "finetune-cancel": OWNER_AND_SUPPORT,
    "finetune-adapter": OWNER,  # its adapter: what the owner's data trained, not support staff's
    "finetune-share": OWNER,  # only the owner shares it on (support staff may look, not hand it on)
    "finetune-unshare": OWNER,
    # Its comparisons: seen by support staff as the run is; a new one is started by the owner alone
    # (tests/jobs/finetune/test_compare.py).
    "finetune-compare": OWNER_AND_SUPPORT,
    "finetune-comparison": OWNER_AND_SUPPORT,
    "account-test": OWNER,  # a cluster account: its user's alone
    # The owner's model service for the lab, which alan is in (whatever his grants of the session): its page is for
    # those who may use it and support staff; scaling and stopping it, its owner's alone.
    "service": frozenset({"owner", "support_user", "chat_grant", "api_grant", "expired", "revoked"}),
    "service-scale": OWNER,
    "service-stop": OWNER,
    "service-chat": MEMBERS,
    "service-chat-new": MEMBERS,
}
# A conversation's routes: who reaches the owner's conversation, and who the grantee's own (never the owner).
CONVERSATIONS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    name: (OWNER_AND_SUPPORT, frozenset({"chat_grant", "support_user"}))
    for name in ("chat-save", "chat-truncate", "chat-send", "chat-manage", "chat-export")
}
# A conversation with the service: its owner's alone, whoever else may use the service (support staff included).
SERVICE_CONVERSATIONS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    f"service-{name}": (OWNER, ALAN) for name in CONVERSATIONS
}
# Asked last, in this order, since they change what the others see (delete refuses a running session).
ACTS = ["unshare", "delete", "batch-stop", "cancel", "service-stop", "finetune-cancel"]


@dataclass(frozen=True)
class Ask:
    """One request to a route of the door's and who reaches what it names. `path` and `model` are formatted with the
    world's names ({session}, {run}, {file}); a listing (`listed`: key and value) is reached when it holds the
    object, anything else when the answer is not 401, 403 or 404."""

    route: str
    what: str
    reachers: frozenset[str]
    method: str
    path: str
    model: str = ""  # a completion's model, or the model the lines of the caller's own batch file name
    listed: tuple[str, str] = ("", "")
    browser: bool = False  # signed in with the session cookie (else a personal token)


OTHER_ROUTES = [name for name in API_ROUTES if name not in ("chat/completions", "models")]

# The API's chat: by uuid, support staff and an API grant too; by owner/alias, an API grant; a bare alias is the
# caller's own name only. Files and batches are their owner's alone, and only the owner starts a run on a session.
DOOR = [
    Ask("session-proxy", "the browser's chat with the session", CHATTERS, "POST",
        "/sessions/{session}/v1/chat/completions", browser=True),
    Ask("api", "a completion naming the session's uuid", frozenset({"owner", "support_user", "api_grant"}), "POST",
        "/api/v1/chat/completions", model="{session}"),
    Ask("api", "a completion naming owner/alias", frozenset({"owner", "api_grant"}), "POST",
        "/api/v1/chat/completions", model="ada/lab-model"),
    Ask("api", "a completion naming the bare alias", OWNER, "POST", "/api/v1/chat/completions", model="lab-model"),
    Ask("api", "the models list naming the session", frozenset({"owner", "api_grant"}), "GET", "/api/v1/models",
        listed=("session", "{session}")),
    # Every other route of the API (Anthropic's messages, responses, tokenize, ...), from the one table of them: the
    # same people as a completion, by uuid and by owner/alias; in the browser, those who chat.
    *[Ask("api", f"{name} naming the session's uuid", frozenset({"owner", "support_user", "api_grant"}), "POST",
          f"/api/v1/{name}", model="{session}") for name in OTHER_ROUTES],
    *[Ask("api", f"{name} naming owner/alias", frozenset({"owner", "api_grant"}), "POST", f"/api/v1/{name}",
          model="ada/lab-model") for name in OTHER_ROUTES],
    Ask("session-proxy", "the browser's messages to the session", CHATTERS, "POST",
        "/sessions/{session}/v1/messages", browser=True),
    # The lab's service, which has no replica ready: its members are answered 503 with Retry-After, the rest 404.
    Ask("service-proxy", "the browser's chat with the service", MEMBERS, "POST",
        f"/services/{SERVICE}/v1/chat/completions", browser=True),
    Ask("api-files", "the files list holding the owner's file", OWNER, "GET", "/api/v1/files", listed=("id", "{file}")),
    Ask("api-file", "the owner's file", OWNER, "GET", "/api/v1/files/{file}"),
    Ask("api-file", "the owner's batch's output file", OWNER, "GET", "/api/v1/files/file-output-{run}"),
    Ask("api-file", "deleting the owner's file (in use by their batch: refused, not deleted)", OWNER, "DELETE",
        "/api/v1/files/{file}"),
    Ask("api-file-content", "the owner's file's content", OWNER, "GET", "/api/v1/files/{file}/content"),
    Ask("api-file-content", "the owner's batch's output", OWNER, "GET", "/api/v1/files/file-output-{run}/content"),
    Ask("api-batches", "the batches list holding the owner's batch", OWNER, "GET", "/api/v1/batches",
        listed=("id", "batch_{run}")),
    Ask("api-batches", "a batch on the session by uuid", OWNER, "POST", "/api/v1/batches", model="{session}"),
    Ask("api-batches", "a batch on the session by owner/alias", OWNER, "POST", "/api/v1/batches",
        model="ada/lab-model"),
    Ask("api-batches", "a batch on the session by the bare alias", OWNER, "POST", "/api/v1/batches", model="lab-model"),
    Ask("api-batch", "the owner's batch", OWNER, "GET", "/api/v1/batches/batch_{run}"),
    Ask("api-batch-cancel", "cancelling the owner's batch", OWNER, "POST", "/api/v1/batches/batch_{run}/cancel"),
    # OpenAI's fine-tuning API: the owner's fine-tune run (as a job), its events and checkpoints, their alone; a job
    # from the owner's file (a batch file: refused with why, to the owner; a stranger's 404).
    Ask("api-ft-jobs", "the jobs list holding the owner's run", OWNER, "GET", "/api/v1/fine_tuning/jobs",
        listed=("id", "{ftjob}")),
    Ask("api-ft-jobs", "a job from the owner's file", OWNER, "POST", "/api/v1/fine_tuning/jobs"),
    Ask("api-ft-job", "the owner's run as a job", OWNER, "GET", "/api/v1/fine_tuning/jobs/{ftjob}"),
    Ask("api-ft-job-events", "the owner's run's events", OWNER, "GET", "/api/v1/fine_tuning/jobs/{ftjob}/events"),
    Ask("api-ft-job-checkpoints", "the owner's run's checkpoints", OWNER, "GET",
        "/api/v1/fine_tuning/jobs/{ftjob}/checkpoints"),
    Ask("api-ft-job-cancel", "cancelling the owner's run", OWNER, "POST", "/api/v1/fine_tuning/jobs/{ftjob}/cancel"),
]  # fmt: skip


def routes() -> dict[str, str]:
    """Every route outside the admin that names something (its path has a parameter) or serves the API: its pattern,
    by name (a nameless one under its pattern, which the matrix cannot name)."""
    found: dict[str, str] = {}

    def walk(patterns: Any, prefix: str) -> None:
        for p in patterns:
            if isinstance(p, URLResolver):
                if not str(p.pattern).startswith("admin/"):
                    walk(p.url_patterns, prefix + str(p.pattern))
            elif isinstance(p, URLPattern):
                pattern = prefix + str(p.pattern)
                if "<" in pattern or pattern.startswith("/api/v1/"):
                    found[p.name or pattern] = pattern

    walk(get_resolver().url_patterns, "/")
    return found


def test_every_route_that_names_something_or_serves_the_api_is_in_the_matrix() -> None:
    found = routes()
    assert set(found) == set(PAGES) | set(CONVERSATIONS) | set(SERVICE_CONVERSATIONS) | {ask.route for ask in DOOR}, (
        "add each new route to the matrix with who may reach it"
    )
    for name, pattern in found.items():
        example = re.sub(r"<uuid:\w+>", "00000000-0000-4000-8000-000000000000", pattern)
        example = re.sub(r"<[^>]+>", "x", example)
        assert guard.guards(example) == (name in {ask.route for ask in DOOR}), f"{name}: served at the door or not?"
    assert not set(ACTS) - set(PAGES)


@dataclass
class World:
    session: LLMSession
    run: BatchRun
    grant: SessionShare
    owners_chat: Conversation
    members_chat: Conversation
    file: BatchFile
    owners_service_chat: Conversation
    members_service_chat: Conversation
    finetune: FineTuneRun
    comparison: FineTuneComparison

    def names(self) -> dict[str, str]:
        return {"session": str(self.session.pk), "run": self.run.pk.hex, "file": f"file-{self.file.pk.hex}",
                "ftjob": f"ftjob-{self.finetune.pk.hex}"}  # fmt: skip


def closed_port() -> int:
    """A loopback port nothing listens on: the owner's requests are forwarded there and refused (502)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def own_file(user: Any, model: str) -> BatchFile:
    """A batch input file of the user's own whose lines name `model`, as files.create stores it."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello"}]}
    lines = [{"custom_id": f"q{n}", "method": "POST", "url": "/v1/chat/completions", "body": body} for n in range(2)]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    stored = BatchFile(owner=user, filename="batch.jsonl", size_bytes=len(content))
    stored.content.save("input.jsonl", ContentFile(content), save=False)
    stored.save()
    return stored


@pytest.fixture
def world(
    account: ClusterAccount, owner: Any, shared_user: Any, settings: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any,
) -> World:  # fmt: skip
    """The owner's batch launch, running as `lab-model` and shared with alan, with a conversation each, the owner's
    uploaded file as its batch's input, and the owner's model service for the lab; nothing here reaches a cluster."""
    settings.MEDIA_ROOT = tmp_path
    form = batch_form(b"one\ntwo\n", max_tokens=5)
    assert form.is_valid(), form.errors
    assert form.checked is not None
    with django_capture_on_commit_callbacks(execute=False):
        session = actions.launch(owner, {**LAUNCH, "purpose": "batch"}, batch=form.checked)
        service = services.create(owner, SERVICE, LAUNCH, audience="groups", groups=owner.groups.all())
    transition(session.pk, State.RUNNING, cause="test", host="127.0.0.1", port=closed_port(), alias="lab-model")
    upload = own_file(owner, "ada/lab-model")
    BatchRun.objects.filter(session=session).update(input_file=upload)

    def no_results(run: BatchRun, max_record_bytes: int | None = None) -> tuple[bool, Iterator[Any]]:
        return True, iter(())

    monkeypatch.setattr(staging, "results", no_results)
    monkeypatch.setattr(login, "check", lambda account: login.LoginCheck(True, "checked"))
    finetune, run = finetune_run(session), BatchRun.objects.get(session=session)
    return World(
        session=LLMSession.objects.get(pk=session.pk),
        run=BatchRun.objects.get(session=session),
        grant=SessionShare.objects.create(session=session, user=shared_user, created_by=owner),
        owners_chat=Conversation.objects.create(session=session, owner=owner),
        members_chat=Conversation.objects.create(session=session, owner=shared_user),
        file=upload,
        owners_service_chat=Conversation.objects.create(service=service, owner=owner),
        members_service_chat=Conversation.objects.create(service=service, owner=shared_user),
        finetune=finetune,
        # The run's comparison, its two batch runs (the same row here: only who reaches it is asked).
        comparison=FineTuneComparison.objects.create(
            owner=owner, run=finetune, source="prompts", name="q.txt", prompts=2, base_batch=run, adapter_batch=run
        ),
    )


def finetune_run(session: LLMSession) -> FineTuneRun:
    """The owner's fine-tune run where the session runs (a row as the form would make it; nothing submitted)."""
    install = ClusterRuntime.objects.get(cluster=session.cluster, runtime__kind="transformers")
    where = {name: getattr(session, name) for name in ("owner", "account", "cluster", "partition", "gpu_type",
                                                       "gpus_per_node", "cpus_per_node", "memory_gib", "walltime_min",
                                                       "variant")}  # fmt: skip
    return FineTuneRun.objects.create(
        **where,
        runtime=install,
        name="toy.jsonl",
        data_format="chat",
        train_examples=4,
        dataset_sha256="0" * 64,
        planned_steps=4,
        precision="bf16",
    )


def as_role(role: str, world: World, request: pytest.FixtureRequest) -> Any:
    """The user who asks in this role (None: anonymous), with the grant as the role has it."""
    if role == "anonymous":
        return None
    if role == "owner":
        return world.session.owner
    if role in ("other_user", "staff_user", "support_user"):
        return request.getfixturevalue(role)
    grant = SessionShare.objects.filter(pk=world.grant.pk)
    if role == "chat_grant":
        grant.update(api=False)
    elif role == "api_grant":
        grant.update(chat=False)
    elif role == "expired":
        grant.update(expires_at=timezone.now() - timedelta(minutes=1))
    else:
        assert role == "revoked"
        grant.update(revoked_at=timezone.now())
    assert world.grant.user is not None and world.grant.user.get_username() == GRANTEE
    return world.grant.user


def page_url(pattern: str, world: World, conversation: Conversation | None = None) -> str:
    values = {
        "pk": world.run.pk if pattern.startswith("/batch/") else world.session.pk,
        **({"pk": world.finetune.pk} if pattern.startswith("/finetune/") else {}),
        "conversation_id": conversation.pk if conversation else "",
        "share_pk": world.grant.pk,
        "comparison": world.comparison.pk,
        "fmt": "jsonl",
        "name": SERVICE,
    }
    if pattern.startswith("/clusters/accounts/"):
        values["pk"] = world.session.account_id
    return re.sub(r"<(?:\w+:)?(\w+)>", lambda m: str(values[m.group(1)]), pattern)


def page_reached(client: Client, url: str) -> bool:
    """Whether the page answered with anything but 404 or the sign-in page (for GET, else for POST when GET is not
    its method)."""
    reply = client.get(url)
    if reply.status_code == 405:
        reply = client.post(url, {"message": "", "from": "0"})
    to_sign_in = reply.status_code == 302 and reply["Location"].startswith(resolve_url(settings.LOGIN_URL) + "?")
    return reply.status_code != 404 and not to_sign_in


@pytest.mark.django_db
@pytest.mark.parametrize("role", ROLES)
def test_each_role_reaches_exactly_the_pages_it_may(
    role: str, world: World, request: pytest.FixtureRequest, client: Client
) -> None:
    user = as_role(role, world, request)
    if user is not None:
        client.force_login(user)
    found = routes()
    asked: list[tuple[str, str, bool]] = []  # (what, url, may reach)
    for name, reachers in PAGES.items():
        asked.append((name, page_url(found[name], world), role in reachers))
    for name, (owners, members) in CONVERSATIONS.items():
        asked.append((f"{name} (the owner's conversation)", page_url(found[name], world, world.owners_chat),
                      role in owners))  # fmt: skip
        asked.append((f"{name} (the grantee's conversation)", page_url(found[name], world, world.members_chat),
                      role in members))  # fmt: skip
    for name, (owners, members) in SERVICE_CONVERSATIONS.items():
        asked.append((f"{name} (the owner's conversation)", page_url(found[name], world, world.owners_service_chat),
                      role in owners))  # fmt: skip
        asked.append((f"{name} (alan's conversation)", page_url(found[name], world, world.members_service_chat),
                      role in members))  # fmt: skip
    asked.sort(key=lambda a: ACTS.index(a[0]) if a[0] in ACTS else -1)  # stable: the others keep their order
    wrong = [f"{what} {url}: {'refused' if may else 'reached'}" for what, url, may in asked
             if page_reached(client, url) != may]  # fmt: skip
    assert not wrong, "\n".join(wrong)
    if role not in OWNER_AND_SUPPORT:  # nothing changed by those who may not
        assert LLMSession.objects.get(pk=world.session.pk).state == State.RUNNING
        assert SessionShare.objects.count() == 1 and Conversation.objects.filter(owner=world.session.owner).count() == 2


def door_reached(reply: httpx.Response, listed: tuple[str, str]) -> bool:
    if listed[0]:
        key, value = listed
        return reply.status_code == 200 and value in [entry.get(key) for entry in reply.json()["data"]]
    return reply.status_code not in (401, 403, 404)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("role", ROLES)
def test_each_role_reaches_exactly_what_it_may_through_the_door(
    role: str, world: World, request: pytest.FixtureRequest
) -> None:
    user = as_role(role, world, request)
    token = bearer(ApiToken.issue(user, "script")[1]) if user is not None else {}
    pages = browser(user) if user is not None else {}
    names = world.names()
    wrong = []
    for ask in DOOR:
        path = ask.path.format(**names)
        assert resolve(path).url_name == ask.route, path
        portal = Portal(pages if ask.browser else token)
        model = ask.model.format(**names)
        if ask.route == "api-batches" and ask.method == "POST":
            mine = f"file-{own_file(user, model).pk.hex}" if user is not None else "file-x"
            reply = portal.post(path, json={"input_file_id": mine, "endpoint": "/v1/chat/completions"})
        elif ask.route == "api-ft-jobs" and ask.method == "POST":
            reply = portal.post(path, json={"model": "tiny-llama", "training_file": names["file"]})
        elif ask.method == "POST":
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            reply = portal.post(path, json=body)
        else:
            reply = portal.request(ask.method, path)
        if door_reached(reply, (ask.listed[0], ask.listed[1].format(**names))) != (role in ask.reachers):
            wrong.append(f"{ask.route}, {ask.what}: {'refused' if role in ask.reachers else 'reached'} "
                         f"({reply.status_code} {reply.text[:200]})")  # fmt: skip
    assert not wrong, "\n".join(wrong)
    assert BatchFile.objects.filter(pk=world.file.pk).exists()
    if role != "owner":
        assert BatchRun.objects.count() == 1 and BatchRun.objects.get().stop_requested_at is None
        assert LLMSession.objects.get(pk=world.session.pk).state == State.RUNNING
        assert FineTuneRun.objects.get().state == FineTuneRun.State.QUEUED
