"""Every page a researcher and an admin reach, in Chromium at a laptop's width (1280 px) and a phone's (390 px),
against a portal whose database the test fills itself: no Slurm cluster is needed. The pages come from the URL
configuration (a new route fails test_every_route_is_visited_or_left_out_for_a_reason until it is one or the other).

Each page is saved whole as var/test-artifacts/browser/pages/<width>/<page>.png, and checked for what made pages read
badly before: nothing wider than the window (a table scrolls inside its own box instead), every checkbox on the line
of its label, the home page's cluster cards wide enough that a GPU's name is not wrapped word by word, and the usage
chart's axes without a label twice."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth.models import Group
from django.core.cache import cache
from django.core.files.base import ContentFile
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone
from playwright.sync_api import Browser, BrowserContext, Page, expect

from catalog.models import Cluster, ClusterAccount, ClusterRuntime, GPUType, ModelVariant, Partition, Runtime
from jobs.cluster.logs import LogTail
from jobs.models import (
    Allocation,
    ApiToken,
    BatchRun,
    ChatMessage,
    Conversation,
    FineTuneComparison,
    FineTuneRun,
    LLMSession,
    ModelService,
    PartitionState,
    ProxyRequest,
    SessionEvent,
    SessionShare,
    State,
)
from jobs.sessions.measuring import keep_for_the_site
from tests.conftest import REPO
from tests.e2e.test_worker import worker_env
from tests.worker import PortalServer

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
ARTIFACTS = REPO / "var" / "test-artifacts" / "browser" / "pages"
WIDTHS = (1280, 390)  # a laptop, a phone
HEIGHT = 900
PASSWORD = "correct horse battery"  # tests/conftest.py's users
ADMIN_PASSWORD = "password"  # pytest-django's admin_user
# Lines a home page card's texts may take at either width: a fact's name ("Most on one node") one, a value (a GPU's
# name, "NVIDIA A100 80GB (80 GiB)") two; cards too narrow once wrapped them over four to eight.
CARD_TERM_LINES, CARD_VALUE_LINES = 1, 2

# Routes that are not pages a person reads, or that no page of this test reaches without a cluster, and why.
LEFT_OUT = {
    "healthz": "a load balancer's health check, plain text",
    "logout": "POST only (the Sign out button)",
    "jobs:card": "one session's card, the partial My sessions polls; My sessions is visited",
    "jobs:cancel": "POST only",
    "jobs:delete": "POST only",
    "jobs:relaunch": "redirects to the launch wizard with a session's choices; the wizard is visited",
    "jobs:share": "POST only (the Sharing form, on the session's page)",
    "jobs:unshare": "POST only",
    "jobs:account-test": "POST only, and it logs in to the cluster",
    "jobs:session-proxy": "the model server's API through the proxy (JSON)",
    "jobs:chat-new": "POST only",
    "jobs:chat-save": "the chat's script saves an exchange (JSON)",
    "jobs:chat-truncate": "the chat's script (JSON)",
    "jobs:chat-send": "POST only (the chat without JavaScript)",
    "jobs:chat-manage": "POST only (rename, delete)",
    "jobs:chat-export": "a download (JSON or Markdown)",
    "jobs:api-files": "OpenAI's Files API (JSON)",
    "jobs:api-file": "OpenAI's Files API (JSON)",
    "jobs:api-file-content": "OpenAI's Files API (a download)",
    "jobs:api-batches": "OpenAI's Batch API (JSON)",
    "jobs:api-batch": "OpenAI's Batch API (JSON)",
    "jobs:api-batch-cancel": "OpenAI's Batch API: cancel (JSON)",
    "jobs:api-ft-jobs": "OpenAI's fine-tuning API (JSON)",
    "jobs:api-ft-job": "OpenAI's fine-tuning API (JSON)",
    "jobs:api-ft-job-cancel": "OpenAI's fine-tuning API: cancel (JSON)",
    "jobs:api-ft-job-events": "OpenAI's fine-tuning API: events (JSON)",
    "jobs:api-ft-job-checkpoints": "OpenAI's fine-tuning API: checkpoints (JSON)",
    "jobs:finetune-adapter": "a download (the adapter as .tar.gz), streamed from the cluster",
    "jobs:api": "the OpenAI-compatible API (JSON)",
    "jobs:batch-output": "a download, streamed from the cluster",
    "jobs:batch-stop": "POST only",
    "jobs:finetune-cancel": "POST only",
    "jobs:finetune-share": "POST only (the Sharing form, on a completed run's page)",
    "jobs:finetune-unshare": "POST only",
    "jobs:site-usage-csv": "a download (CSV)",
    "jobs:metrics": "Prometheus text for a scraper",
    "jobs:service-scale": "POST only (the Scale form, on the service's page)",
    "jobs:service-stop": "POST only",
    "jobs:service-proxy": "the model server's API through the proxy, by the service's name (JSON)",
    "jobs:service-chat-new": "POST only",
    "jobs:service-chat-save": "the chat's script saves an exchange (JSON)",
    "jobs:service-chat-truncate": "the chat's script (JSON)",
    "jobs:service-chat-send": "POST only (the chat without JavaScript)",
    "jobs:service-chat-manage": "POST only (rename, delete)",
    "jobs:service-chat-export": "a download (JSON or Markdown)",
    "admin:login": "Django's own sign-in; the portal's is visited and admins use it",
    "admin:logout": "POST only",
    "admin:password_change": "Django's own password form (portal users' passwords are set by admins)",
    "admin:password_change_done": "Django's own page after a password change",
    "admin:auth_user_password_change": "Django's own form for setting a user's password",
    "admin:autocomplete": "JSON for the admin's autocomplete widgets",
    "admin:jsi18n": "JavaScript",
    "admin:view_on_site": "redirects to an object's page on the site",
    "admin:catalog_cluster_discover": "asks the cluster's Slurm over SSH",
    "admin:catalog_cluster_scan": "lists model files on the cluster over SSH",
    "admin:": "Django's own redirects (an object's bare URL, the catch-all)",
}
# The admin's per-model routes other than the changelist: Django's own forms, alike for every model; the cluster's
# change form, which the portal extends, is visited.
ADMIN_MODEL_ROUTES_LEFT_OUT = {
    "add": "Django's add form, the change form's layout",
    "change": "Django's change form, alike for every model (the cluster's, which the portal extends, is visited)",
    "delete": "Django's confirmation page",
    "history": "Django's history page",
}


def route_names() -> set[str]:
    """Every route's name, with its namespace ("jobs:launch", "admin:index"); unnamed ones as "namespace:"."""
    names: set[str] = set()

    def walk(patterns: list[Any], namespace: str) -> None:
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns, f"{namespace}{p.namespace}:" if p.namespace else namespace)
            elif isinstance(p, URLPattern):
                names.add(namespace + (p.name or ""))

    walk(get_resolver().url_patterns, "")
    return names


def admin_model_routes() -> dict[str, str]:
    """Each registered model's admin routes: what kind of page each is ("changelist", "add", ...)."""
    return {
        f"admin:{model._meta.app_label}_{model._meta.model_name}_{kind}": kind
        for model in admin.site._registry
        for kind in ("changelist", *ADMIN_MODEL_ROUTES_LEFT_OUT)
    }


@dataclass(frozen=True)
class Site:
    """What the test put in the database, for the pages' URLs."""

    running: LLMSession
    ended: LLMSession
    batch: BatchRun
    service: ModelService
    finetune: FineTuneRun
    comparison: FineTuneComparison


@dataclass(frozen=True)
class Visit:
    route: str  # the URL's name
    slug: str  # the screenshot's name
    who: str  # "ada" (a researcher), "alan" (a newcomer), "admin", or "" (not signed in)
    path: str | Callable[[Page], str]  # a path, or how to find it with the same user's page


def visits(site: Site) -> list[Visit]:
    """Every page this test looks at: a researcher's, a newcomer's and an admin's, and the two a visitor sees."""
    running, ended = site.running.pk, site.ended.pk
    launch = reverse("jobs:launch")
    cluster = reverse("admin:catalog_cluster_change", args=[site.running.cluster_id])
    add_from_file = reverse("admin:catalog_modelcard_add_from_file")
    apps = sorted({model._meta.app_label for model in admin.site._registry})
    model = "model=tiny-llama&quant=F16&runtime=llama.cpp&context=1024"

    def batch_launch(page: Page) -> str:
        page.goto(f"{launch}?{model}&purpose=batch")
        return page.get_by_role("link", name="Batch run with a file…").first.get_attribute("href") or ""

    found = [
        Visit("home", "home-visitor", "", reverse("home")),
        Visit("login", "sign-in", "", reverse("login")),
        Visit("home", "home", "ada", reverse("home")),
        Visit("jobs:launch", "launch", "ada", launch),
        Visit("jobs:launch", "launch-options", "ada", f"{launch}?{model}"),
        Visit("jobs:sessions", "sessions", "ada", reverse("jobs:sessions")),
        Visit("jobs:session", "session", "ada", reverse("jobs:session", args=[running])),
        Visit("jobs:log", "session-log", "ada", reverse("jobs:log", args=[ended])),
        Visit("jobs:accounts", "accounts", "ada", reverse("jobs:accounts")),
        Visit("jobs:chat", "chat", "ada", reverse("jobs:chat", args=[running])),
        Visit("jobs:services", "services", "ada", reverse("jobs:services")),
        Visit("jobs:service", "service", "ada", reverse("jobs:service", args=[site.service.name])),
        Visit("jobs:service", "service-member", "alan", reverse("jobs:service", args=[site.service.name])),
        Visit(
            "jobs:service-new",
            "service-new",
            "ada",
            f"{reverse('jobs:service-new')}?{model}&cluster=local&partition=gpu&gpu=a100-80g&gpus=1",
        ),
        Visit("jobs:service-chat", "service-chat", "ada", reverse("jobs:service-chat", args=[site.service.name])),
        Visit("jobs:tokens", "tokens", "ada", reverse("jobs:tokens")),
        Visit("jobs:batches", "batches", "ada", reverse("jobs:batches")),
        Visit("jobs:batch", "batch", "ada", reverse("jobs:batch", args=[site.batch.pk])),
        Visit("jobs:batch-new", "batch-new", "ada", batch_launch),
        Visit("jobs:session-batch-new", "session-batch-new", "ada", reverse("jobs:session-batch-new", args=[running])),
        Visit("jobs:finetunes", "finetunes", "ada", reverse("jobs:finetunes")),
        Visit("jobs:finetune", "finetune", "ada", reverse("jobs:finetune", args=[site.finetune.pk])),
        Visit("jobs:finetune-new", "finetune-new", "ada", f"{reverse('jobs:finetune-new')}?model=tiny-llama"),
        Visit(
            "jobs:finetune-compare",
            "finetune-compare",
            "ada",
            reverse("jobs:finetune-compare", args=[site.comparison.run_id]),
        ),
        Visit(
            "jobs:finetune-comparison",
            "finetune-comparison",
            "ada",
            reverse("jobs:finetune-comparison", args=[site.comparison.run_id, site.comparison.pk]),
        ),
        Visit("jobs:usage", "usage", "ada", reverse("jobs:usage")),
        Visit("jobs:usage", "usage-newcomer", "alan", reverse("jobs:usage")),
        Visit("jobs:site-usage", "site-usage", "admin", reverse("jobs:site-usage")),
        Visit("jobs:dashboard", "dashboard", "admin", reverse("jobs:dashboard")),
        Visit("admin:index", "admin", "admin", reverse("admin:index")),
        Visit("admin:catalog_cluster_change", "admin-cluster", "admin", cluster),
        Visit("admin:catalog_modelcard_add_from_file", "admin-add-from-file", "admin", add_from_file),
    ]
    found += [Visit("admin:app_list", f"admin-{app}", "admin", reverse("admin:app_list", args=[app])) for app in apps]
    changelists = [route for route, kind in admin_model_routes().items() if kind == "changelist"]
    found += [Visit(route, route.replace("admin:", "admin-"), "admin", reverse(route)) for route in changelists]
    return found


def test_every_route_is_visited_or_left_out_for_a_reason(site: Site) -> None:
    visited = {v.route for v in visits(site)}
    left_out = set(LEFT_OUT) | {r for r, kind in admin_model_routes().items() if kind in ADMIN_MODEL_ROUTES_LEFT_OUT}
    routes = route_names()
    unseen, gone = routes - visited - left_out, (visited | set(LEFT_OUT)) - routes
    assert not unseen, f"visit these pages in test_pages.py, or say in LEFT_OUT why not: {sorted(unseen)}"
    assert not gone, f"these routes are gone: drop them from test_pages.py: {sorted(gone)}"


@pytest.fixture(scope="module")
def portal(django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """uvicorn on the test database. No worker: nothing here reaches a cluster, and the wizard does not ask Slurm for
    start estimates (as a site that turned them off)."""
    with django_db_blocker.unblock():
        env = {**worker_env(), "PORTAL_WIZARD_ASKS_SLURM": "0"}
    server = PortalServer(env, tmp_path_factory.mktemp("portal") / "uvicorn.log")
    yield server.start()
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def _fresh_screenshots() -> None:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)


@pytest.fixture
def site(account: ClusterAccount, owner: Any, other_user: Any, shared_user: Any, admin_user: Any, lab: Group) -> Site:
    """A researcher (ada) with sessions in several states, one shared with grace and her lab, one of grace's shared
    with her, a chat, batch runs, API tokens and a month of requests; alan, a newcomer whose one session ran for
    seconds; the cluster's idle GPUs as beat last read them."""
    now = timezone.now()
    local = Cluster.objects.get(slug="local")
    grace_account = ClusterAccount.objects.create(cluster=local, user=other_user, username="grace")
    alan_account = ClusterAccount.objects.create(cluster=local, user=shared_user, username="alan")

    shape = {
        "cluster": local,
        "partition": Partition.objects.get(cluster=local, name="gpu"),
        "gpu_type": GPUType.objects.get(name="a100-80g"),
        "variant": ModelVariant.objects.filter(model__name="tiny-llama").first(),
        "runtime": Runtime.objects.get(kind="llama.cpp"),
        "gpus_per_node": 1,
        "cpus_per_node": 4,
        "memory_gib": 16,
        "context_length": 1024,
    }

    def session(owner: Any, account: ClusterAccount, state: State, **fields: Any) -> LLMSession:
        return LLMSession.objects.create(owner=owner, account=account, state=state, **shape, **fields)

    running = session(owner, account, State.RUNNING, job_id="4242", node_list="gpu-a100-01", host="127.0.0.1",
                      port=9, started_at=now - timedelta(hours=2), ready_at=now - timedelta(hours=2), alias="ada-tiny",
                      walltime_min=480, idle_cancel_min=60)  # fmt: skip
    # What its server measured, kept as the worker keeps it: the wizard (launch-options) shows it beside the estimate
    measured = {"weights_gib": 0.0002, "kv_gib": 0.00024, "compute_gib": 0.02, "total_gib": 0.02044,
                "total_from": "buffers", "tokens_per_s": 410.5, "prompt_tokens_per_s": 2200.0}  # fmt: skip
    LLMSession.objects.filter(pk=running.pk).update(measured=measured, measured_at=now)
    keep_for_the_site(running, measured, now)
    for before, after, cause in ((State.PENDING, State.QUEUED, "submitted as job 4242"),
                                 (State.QUEUED, State.STARTING, "the job started on gpu-a100-01"),
                                 (State.STARTING, State.RUNNING, "the server answered its health check")):  # fmt: skip
        SessionEvent.objects.create(session=running, from_state=before, to_state=after, cause=cause)
    session(owner, account, State.QUEUED, job_id="4243", slurm_reason="Priority", queue_position=3,
            estimated_start=now + timedelta(minutes=25))  # fmt: skip
    session(owner, account, State.STARTING, job_id="4244", node_list="gpu-a100-02", started_at=now)
    session(owner, account, State.FAILED, job_id="4240", started_at=now - timedelta(days=3),
            ended_at=now - timedelta(days=3, minutes=-2),
            end_reason="The model server exited before it answered its health check: "
                       "llama-server: error while loading shared libraries: libcuda.so.1: cannot open shared object "
                       "file: No such file or directory (see the log)")  # fmt: skip
    session(owner, account, State.CANCELLED, job_id="4239", started_at=now - timedelta(days=5),
            ended_at=now - timedelta(days=5, hours=-3), end_reason="cancelled from the portal")  # fmt: skip
    ended = session(owner, account, State.COMPLETED, job_id="4238", started_at=now - timedelta(days=9),
                    ended_at=now - timedelta(days=9, hours=-1), end_reason="the time limit was reached")  # fmt: skip
    # A log read after the job ended is final: the page shows it and asks the (absent) worker for nothing.
    log = "\n".join(f"srv  log_server_r: request: POST /v1/chat/completions 127.0.0.1 200 ({i} ms)" for i in range(40))
    cache.set(f"job-log:{ended.pk}", LogTail(log, "", now), 3600)

    # Sharing, both ways, and an earlier grant that was stopped.
    SessionShare.objects.create(session=running, user=other_user, created_by=owner)
    SessionShare.objects.create(session=running, group=lab, api=False, created_by=owner,
                                expires_at=now + timedelta(days=7))  # fmt: skip
    SessionShare.objects.create(session=running, user=shared_user, created_by=owner, revoked_at=now)
    graces = session(other_user, grace_account, State.RUNNING, job_id="4300", node_list="gpu-a100-03",
                     host="127.0.0.1", port=9, started_at=now - timedelta(hours=1), alias="grace-llama")  # fmt: skip
    SessionShare.objects.create(session=graces, user=owner, created_by=other_user)
    SessionShare.objects.create(session=graces, user=shared_user, created_by=other_user)

    # A chat, with the Markdown replies are made of.
    conversation = Conversation.objects.create(session=running, owner=owner, title="Slurm array jobs")
    ChatMessage.objects.create(conversation=conversation, role="user", content="How do I submit an array job?")
    ChatMessage.objects.create(
        conversation=conversation, role="assistant", ttft_ms=84, tokens_per_s=61.5, completion_tokens=120,
        content="Use `--array`:\n\n```bash\nsbatch --array=1-100%10 --gres=gpu:a100:1 --time=02:00:00 "
                "--wrap='python train.py --seed $SLURM_ARRAY_TASK_ID --out results/$SLURM_ARRAY_TASK_ID.json'\n```\n\n"
                "- `%10` runs at most ten at once\n- see https://slurm.schedmd.com/job_array.html#job-array-syntax-and-examples",
    )  # fmt: skip

    # Batch runs on the running session: one under way, one that answered ten prompts in three minutes.
    day_ago = now - timedelta(days=1)
    batch = BatchRun.objects.create(
        owner=owner, session=running, name="abstracts-2024-questions.jsonl", input_format="jsonl",
        endpoint="chat/completions", prompts=500, done=120, failed=3, prompt_tokens=48_000, completion_tokens=61_000,
        tokens_per_s=85.3, requests="batch/x/requests.jsonl", state=BatchRun.State.RUNNING,
        started_at=now - timedelta(minutes=20), defaults={"max_tokens": 512, "temperature": 0},
    )  # fmt: skip
    BatchRun.objects.create(
        owner=owner, session=running, name="prompts.txt", input_format="text", endpoint="chat/completions", prompts=10,
        done=10, prompt_tokens=900, completion_tokens=2_400, requests="batch/y/requests.jsonl",
        state=BatchRun.State.FINISHED, started_at=day_ago, finished_at=day_ago + timedelta(minutes=3),
    )  # fmt: skip

    ApiToken.issue(owner, "laptop")
    # Allocations on My usage (the lab's, near its end) and Site usage (both).
    Allocation.objects.create(group=lab, gpu_hours=100, tokens=1_000_000, period="month", soft_percent=1)
    Allocation.objects.create(slurm_account="pi_smith", gpu_hours=2000, period="term", starts_on=now.date(),
                              ends_on=now.date() + timedelta(days=120))  # fmt: skip
    revoked, _ = ApiToken.issue(owner, "analysis-script-on-the-cluster-login-node")
    ApiToken.objects.filter(pk=revoked.pk).update(revoked_at=now, last_used_at=now - timedelta(days=2))

    # A month of requests: ada on hers and on grace's, grace on ada's.
    for day in range(0, 30, 3):
        at = now - timedelta(days=day, hours=1)
        for who, on in ((owner, running), (owner, graces), (other_user, running)):
            ProxyRequest.objects.create(
                session=on, user=who, at=at, route="chat", endpoint="chat/completions", status=200,
                prompt_tokens=300 + 40 * day, completion_tokens=900 + 70 * day, duration_ms=2_500, ttft_ms=90,
                tokens_per_s=58.0,
            )  # fmt: skip

    # Alan's first try: a session that ran for six and a half seconds (a few thousandths of a GPU-hour, the right
    # axis' labels that once read 0.001 twice), and his requests on grace's session, which count as his.
    session(shared_user, alan_account, State.FAILED, job_id="4301", started_at=now - timedelta(days=1),
            ended_at=now - timedelta(days=1) + timedelta(seconds=6.5), end_reason="out of GPU memory")  # fmt: skip
    for _ in range(4):
        ProxyRequest.objects.create(session=graces, user=shared_user, at=now - timedelta(days=1), route="chat",
                                    endpoint="chat/completions", status=200, prompt_tokens=100,
                                    completion_tokens=400, duration_ms=900)  # fmt: skip

    # The idle GPUs beat last read, for the home page's cards, with each cluster's service account (the figures of a
    # cluster without one are not shown).
    for cluster in Cluster.objects.filter(slug__in=["local", "grace", "bouchet"]):
        ClusterAccount.objects.create(cluster=cluster, kind="service", label="portal", username="portalsvc")
    for partition in Partition.objects.filter(cluster__slug__in=["local", "grace", "bouchet"]):
        for gres in {g.gpu_type.gres_type or g.gpu_type.name for g in partition.node_groups.all()}:
            PartitionState.objects.create(partition=partition, gres_type=gres, total_gpus=16, idle_gpus=5,
                                          pending_jobs=2, refreshed_at=now)  # fmt: skip
    # A lab's model service: two ready replicas (one draining, its successor taking over), one queued, a chat.
    service = ModelService.objects.create(name="lab-llama", owner=owner, audience=ModelService.Audience.GROUPS,
                                          launch={"cluster": "local", "partition": "gpu", "gpu": "a100-80g", "gpus": 1,
                                                  "model": "tiny-llama", "quant": "F16", "runtime": "llama.cpp",
                                                  "context": 1024, "walltime": 120},
                                          min_replicas=2, max_replicas=4, desired_replicas=2)  # fmt: skip
    service.groups.set([lab])
    old = session(owner, account, State.RUNNING, job_id="4400", node_list="gpu-a100-01", host="127.0.0.1", port=9,
                  started_at=now - timedelta(minutes=115), ready_at=now - timedelta(minutes=114), walltime_min=120,
                  service=service, draining_since=now - timedelta(seconds=20))  # fmt: skip
    session(owner, account, State.RUNNING, job_id="4401", node_list="gpu-a100-02", host="127.0.0.1", port=9,
            started_at=now - timedelta(minutes=3), ready_at=now - timedelta(minutes=2), walltime_min=120,
            service=service, replaces=old)  # fmt: skip
    session(owner, account, State.QUEUED, job_id="4402", slurm_reason="Resources", walltime_min=120, service=service)
    talk = Conversation.objects.create(service=service, owner=owner, title="Lab FAQ")
    ChatMessage.objects.create(conversation=talk, role="user", content="Where are the lab's datasets?")
    ChatMessage.objects.create(conversation=talk, role="assistant", content="Under `/project/lab/datasets`.")
    # A LoRA run halfway through its steps, requeued once, with its loss curve and a validation loss.
    losses = [[s, round(2.6 / (1 + s / 40), 4), round(2.8 / (1 + s / 45), 4) if s % 50 == 0 else None]
              for s in range(1, 121)]  # fmt: skip
    finetune = FineTuneRun.objects.create(
        owner=owner, account=account, cluster=local, partition=running.partition, gpu_type=running.gpu_type,
        gpus_per_node=1, cpus_per_node=4, memory_gib=16, walltime_min=120, variant=running.variant,
        runtime=ClusterRuntime.objects.get(cluster=local, runtime__kind="transformers"), suffix="support-bot",
        name="support-chats.jsonl", data_format="chat", train_examples=1200, valid_examples=60,
        dataset_sha256="9f" * 32, planned_steps=225, precision="bf16", estimate_gib=6.2,
        state=FineTuneRun.State.RUNNING, job_id="4500", node_list="gpu-a100-01", step=120, epoch=1.6, train_loss=1.12,
        valid_loss=1.31, tokens_per_s=5400.0, peak_memory_gib=5.8, restarts=1, resumed_from_step=100,
        started_at=now - timedelta(minutes=30), progress_at=now, losses=losses,
    )  # fmt: skip
    # A completed run of the same model with a comparison on the validation data, its batch runs just started (the
    # answers would be read from the cluster, which this test has not).
    done = FineTuneRun.objects.get(pk=finetune.pk)
    done.pk, done.state, done.suffix, done.base_valid_loss, done.step = None, "completed", "doors", 2.71, 225
    done.save()
    done = FineTuneRun.objects.get(pk=done.pk)
    compared = []
    for name, answered in (("support-chats.jsonl: validation data (base)", 0),
                           (f"support-chats.jsonl: validation data ({done.model_name})", 1)):  # fmt: skip
        run = BatchRun(owner=owner, session=running, name=name, input_format="jsonl", endpoint="/v1/chat/completions",
                       prompts=60, defaults={"max_tokens": 256, "temperature": 0},
                       state=BatchRun.State.RUNNING if answered else BatchRun.State.WAITING)  # fmt: skip
        questions = [{"line": n, "id": f"example-{n}", "url": "/v1/chat/completions",
                      "body": {"messages": [{"role": "user", "content": f"How do I reset my password ({n})?"}]}}
                     for n in range(1, 61)]  # fmt: skip
        run.requests.save("requests.jsonl", ContentFile("".join(json.dumps(q) + "\n" for q in questions)))
        compared.append(run)
    comparison = FineTuneComparison.objects.create(
        owner=owner, run=done, source="validation", name="support-chats.jsonl: validation data", prompts=60,
        base_batch=compared[0], adapter_batch=compared[1],
    )  # fmt: skip
    return Site(running=running, ended=ended, batch=batch, service=service, finetune=finetune, comparison=comparison)


# What the page says of itself, measured in the browser.
MEASURE = """() => {
  const width = document.documentElement.clientWidth;
  const shown = (el) => el.getClientRects().length > 0;
  const name = (el) => {  // tag#id.class, to say which element sticks out
    const classes = typeof el.className === "string" ? el.className.trim().split(/\\s+/).filter(Boolean) : [];
    return el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") + classes.map(c => "." + c).join("");
  };
  const lines = (el) => {  // how many lines an element's text takes
    const range = document.createRange();
    range.selectNodeContents(el);
    return new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.bottom))).size;
  };
  const texts = (root, selector) => [...root.querySelectorAll(selector)].map(el => [el.textContent.trim(), lines(el)]);
  const scrolls = (el) => {  // inside a box that scrolls sideways, or clips: the page itself stays put
    for (let p = el.parentElement; p; p = p.parentElement) {
      if (["auto", "scroll", "hidden"].includes(getComputedStyle(p).overflowX)) return true;
    }
    return false;
  };
  const wider = [...document.querySelectorAll("body *")]
    .filter(el => shown(el) && el.getBoundingClientRect().right > width + 1 && !scrolls(el))
    .map(el => `${name(el)} (${Math.round(el.getBoundingClientRect().right)} px)`);
  const checkboxes = [...document.querySelectorAll("input[type=checkbox]")].filter(shown).map(box => {
    const label = box.labels && box.labels[0];
    if (!label) return {id: box.id || box.name, label: null};
    const b = box.getBoundingClientRect(), first = label.getClientRects()[0];
    if (!first) return {id: box.id || box.name, label: label.textContent.trim(), ok: false};  // a label not shown
    const sameLine = first.top < b.bottom && first.bottom > b.top;
    const beside = first.left >= b.right - 1 || first.right <= b.left + 1;
    return {id: box.id || box.name, label: label.textContent.trim(), ok: sameLine && beside};
  });
  const cards = [...document.querySelectorAll(".cluster")].map(card => ({
    cluster: card.id,
    terms: texts(card, ".facts dt"),
    values: [...texts(card, ".facts dd"), ...texts(card, ".gpu-counts tbody th")],
  }));
  const axes = [...document.querySelectorAll("svg g.axis")]
    .map(g => [g.getAttribute("class"), [...g.querySelectorAll("text")].map(t => t.textContent)]);
  return {scrollWidth: document.documentElement.scrollWidth, width, wider, checkboxes, cards, axes};
}"""


def problems_of(slug: str, width: int, measured: dict[str, Any]) -> list[str]:
    """What reads badly on one page at one width, in words."""
    found = []
    if measured["scrollWidth"] > measured["width"]:
        found.append(f"{slug} @{width}: {measured['scrollWidth']} px wide in a {measured['width']} px window: "
                     + ", ".join(measured["wider"][:5]))  # fmt: skip
    for box in measured["checkboxes"]:
        if box["label"] is not None and not box["ok"]:
            found.append(f"{slug} @{width}: checkbox {box['id']} is not on the line of its label {box['label']!r}")
        elif box["label"] is None and not slug.startswith("admin"):  # the admin's row selectors have none
            found.append(f"{slug} @{width}: checkbox {box['id']} has no label")
    for card in measured["cards"]:
        for kind, most in (("terms", CARD_TERM_LINES), ("values", CARD_VALUE_LINES)):
            found += [f"{slug} @{width}: {card['cluster']}'s {text!r} takes {lines} lines (at most {most})"
                      for text, lines in card[kind] if lines > most]  # fmt: skip
    for name, labels in measured["axes"]:
        if len(set(labels)) != len(labels):
            found.append(f"{slug} @{width}: the chart's {name} repeats a label: {labels}")
    return found


def signed_in(browser: Browser, url: str, who: str, width: int) -> BrowserContext:
    context = browser.new_context(base_url=url, viewport={"width": width, "height": HEIGHT})
    if who:
        page = context.new_page()
        page.goto(reverse("login"))
        page.get_by_label("Username").fill(who)
        page.get_by_label("Password").fill(ADMIN_PASSWORD if who == "admin" else PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("button", name=f"Sign out {who}")).to_be_visible()
        page.close()
    return context


@pytest.mark.parametrize("width", WIDTHS)
def test_every_page_fits_the_window_and_reads_well(browser: Browser, portal: str, site: Site, width: int) -> None:
    """All pages are looked at before the test fails, so that one run shows every problem and saves every picture."""
    contexts: dict[str, BrowserContext] = {}
    pages: dict[str, Page] = {}
    found: list[str] = []
    folder = ARTIFACTS / str(width)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for visit in visits(site):
            if visit.who not in contexts:
                contexts[visit.who] = signed_in(browser, portal, visit.who, width)
                pages[visit.who] = contexts[visit.who].new_page()
            page = pages[visit.who]
            path = visit.path if isinstance(visit.path, str) else visit.path(page)
            response = page.goto(path)
            assert response is not None and response.ok, f"{visit.slug}: {path} answered {response and response.status}"
            page.screenshot(path=str(folder / f"{visit.slug}.png"), full_page=True)
            found += problems_of(visit.slug, width, page.evaluate(MEASURE))
    finally:
        for context in contexts.values():
            context.close()
    assert not found, "\n".join(found)
