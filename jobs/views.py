"""The researcher's pages: My Sessions (cards, cancel, relaunch, log, delete), cluster accounts, the launch wizard."""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from catalog.models import Cluster
from jobs import ssh, wizard
from jobs.models import END_STATES, ApiToken, ClusterAccount, Session
from jobs.services import launch, request_cancel
from jobs.tasks import fetch_log

LAUNCH_FIELDS = (
    "cluster", "partition", "gpu", "gpus", "nodes", "model", "quant", "runtime", "context", "walltime", "notify",
    "idle_cancel", "account",
)  # fmt: skip


def get_session_for(request: HttpRequest, pk: Any) -> Session:
    """The session if the request's user owns it (or is staff); 404 otherwise, so others cannot even probe ids."""
    sessions = Session.objects.select_related(
        "owner", "cluster", "partition", "gpu_type", "variant__model", "runtime", "account__cluster"
    )
    try:
        session = sessions.get(pk=pk)
    except (Session.DoesNotExist, ValidationError, ValueError):
        raise Http404("no such session") from None
    if session.owner_id != request.user.pk and not request.user.is_staff:
        raise Http404("no such session")
    return session


def _my_sessions(request: HttpRequest) -> QuerySet[Session]:
    return Session.objects.filter(owner_id=request.user.pk or 0).select_related(
        "cluster", "partition", "gpu_type", "variant__model", "runtime"
    )


@login_required
@require_GET
def session_list(request: HttpRequest) -> HttpResponse:
    sessions = list(_my_sessions(request)[:100])
    context = {"sessions": sessions, "live": any(not s.is_ended for s in sessions)}
    if getattr(request, "htmx", False):
        return render(request, "jobs/session_list.html#cards", context)
    return render(request, "jobs/session_list.html", context)


@login_required
@require_GET
def session_card(request: HttpRequest, pk: Any) -> HttpResponse:
    return render(request, "jobs/session_list.html#card", {"s": get_session_for(request, pk)})


@login_required
@require_GET
def session_detail(request: HttpRequest, pk: Any) -> HttpResponse:
    session = get_session_for(request, pk)
    return render(request, "jobs/session_detail.html", {"s": session, "events": session.events.all()})


@login_required
@require_POST
def session_cancel(request: HttpRequest, pk: Any) -> HttpResponse:
    session = get_session_for(request, pk)
    if not session.is_ended:
        request_cancel(session, f"cancelled by {request.user.get_username()} in the browser")
        messages.info(request, "Cancelling: the job is being stopped.")
    if getattr(request, "htmx", False):
        session.refresh_from_db()
        return render(request, "jobs/session_list.html#card", {"s": session})
    return HttpResponseRedirect(reverse("jobs:sessions"))


@login_required
@require_POST
def session_delete(request: HttpRequest, pk: Any) -> HttpResponse:
    session = get_session_for(request, pk)
    if session.state not in END_STATES:
        messages.error(request, "Only ended sessions can be deleted; cancel it first.")
    else:
        session.delete()
        messages.info(request, "Session deleted.")
    if getattr(request, "htmx", False):
        return HttpResponseClientRedirect(reverse("jobs:sessions"))
    return HttpResponseRedirect(reverse("jobs:sessions"))


@login_required
@require_GET
def session_relaunch(request: HttpRequest, pk: Any) -> HttpResponse:
    s = get_session_for(request, pk)
    values = {
        "model": s.variant.model.name,
        "quant": s.variant.quantization,
        "runtime": s.runtime.kind,
        "context": s.context_length,
        "walltime": s.walltime_min,
    }
    return HttpResponseRedirect(reverse("jobs:launch") + "?" + urlencode(values))


@login_required
@require_GET
def session_log(request: HttpRequest, pk: Any) -> HttpResponse:
    session = get_session_for(request, pk)
    try:
        text, error = fetch_log(session), ""
    except ssh.SSHError as exc:
        text, error = "", f"The log cannot be read right now: {exc}"
    context = {"s": session, "log": text, "error": error}
    if getattr(request, "htmx", False):
        return render(request, "jobs/session_log.html#log", context)
    return render(request, "jobs/session_log.html", context)


@login_required
@require_GET
def cluster_accounts(request: HttpRequest) -> HttpResponse:
    me = request.user.pk or 0
    accounts = {a.cluster_id: a for a in ClusterAccount.objects.filter(user_id=me).select_related("cluster")}
    shared = ClusterAccount.objects.filter(members__pk=me).select_related("cluster")
    for account in shared:
        accounts.setdefault(account.cluster_id, account)
    rows = [(cluster, accounts.get(cluster.pk)) for cluster in Cluster.objects.order_by("name")]
    return render(request, "jobs/accounts.html", {"rows": rows})


@login_required
@require_POST
def account_test(request: HttpRequest, pk: int) -> HttpResponse:
    """Log in as the account and ask Slurm something harmless; report success or the precise error."""
    account = ClusterAccount.objects.select_related("cluster").filter(pk=pk).first()
    me = request.user.pk or 0
    if account is None or not (account.user_id == me or account.members.filter(pk=me).exists()):
        raise Http404("no such account")
    try:
        result = ssh.pool.run(account.ssh_target(), "sinfo -h -o %P", timeout_s=20)
        if result.ok:
            partitions = " ".join(result.stdout.split())
            outcome, ok = f"Connected as {account.username}; Slurm answers (partitions: {partitions}).", True
        else:
            outcome, ok = f"Logged in, but sinfo failed: {result.stderr.strip()[:300]}", False
    except ssh.SSHError as exc:
        outcome, ok = str(exc), False
    context = {"account": account, "outcome": outcome, "ok": ok}
    if getattr(request, "htmx", False):
        return render(request, "jobs/accounts.html#test-result", context)
    (messages.success if ok else messages.error)(request, outcome)
    return HttpResponseRedirect(reverse("jobs:accounts"))


@login_required
@require_http_methods(["GET", "POST"])
def launch_view(request: HttpRequest) -> HttpResponse:
    """The wizard. GET shows (and, when htmx asks, re-renders) the choices, estimate and options; POST launches."""
    if request.method == "POST":
        data = {name: request.POST.get(name, "") for name in LAUNCH_FIELDS}
        try:
            session = launch(request.user, {k: v for k, v in data.items() if v != ""}, request.POST.get("token", ""))
        except ValidationError as exc:
            state = wizard.build(request.user, request.POST, errors=_messages(exc))
            return render(request, "jobs/launch.html", {"w": state, "token": request.POST.get("token", "")})
        request.session["last_launch"] = {k: v for k, v in data.items() if k in wizard.REMEMBERED}
        messages.success(request, "Session created: submitting it to Slurm.")
        return HttpResponseRedirect(reverse("jobs:sessions") + f"#s-{session.pk}")
    params: dict[str, Any] = dict(request.GET.items()) or dict(request.session.get("last_launch", {}))
    state = wizard.build(request.user, params)
    context = {"w": state, "token": secrets.token_urlsafe(16)}
    if getattr(request, "htmx", False):
        return render(request, "jobs/launch.html#wizard", context)
    return render(request, "jobs/launch.html", context)


def _messages(exc: ValidationError) -> list[str]:
    if hasattr(exc, "error_dict"):
        out = []
        for field, errors in exc.error_dict.items():
            for error in errors:
                for message in error.messages:
                    out.append(message if field == "__all__" else f"{field}: {message}")
        return out
    return list(exc.messages)


@login_required
@require_http_methods(["GET", "POST"])
def api_tokens(request: HttpRequest) -> HttpResponse:
    """Create (shown once), list and revoke personal API tokens."""
    created = ""
    if request.method == "POST":
        if "revoke" in request.POST:
            ApiToken.objects.filter(pk=request.POST.get("revoke") or 0, user_id=request.user.pk or 0).update(
                revoked_at=timezone.now()
            )
            messages.info(request, "Token revoked: scripts using it are refused from now on.")
            return HttpResponseRedirect(reverse("jobs:tokens"))
        name = (request.POST.get("name") or "").strip()[:100]
        if not name:
            messages.error(request, "Give the token a name, e.g. the machine or script that uses it.")
        else:
            _, created = ApiToken.issue(request.user, name)
    tokens = ApiToken.objects.filter(user_id=request.user.pk or 0)
    base = request.build_absolute_uri(reverse("jobs:api", args=["x"])).removesuffix("/x")
    return render(request, "jobs/tokens.html", {"tokens": tokens, "created": created, "base": base})
