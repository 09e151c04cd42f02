"""The researcher's session pages: the home page's cluster cards, the launch wizard, My Sessions (cards, cancel,
relaunch, log, delete), and the cluster accounts they launch with."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from catalog.models import Cluster, ClusterAccount, GPUType, ModelCard
from jobs.cluster import login, logs
from jobs.models import END_STATES, ModelService, State
from jobs.sessions import actions, clusters_summary, sharing, wizard
from jobs.sessions.access import get_session_for, with_relations
from jobs.sessions.forms import ChoicesForm, values_of
from portal.errors import messages_of
from portal.htmx import HtmxHttpRequest, render_page, render_partial

# The wizard's choices, remembered between launches under this key of the browser session.
LAST_LAUNCH = "last_launch"


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    """The public front page: what the portal does, and a card per cluster (for the signed-in user, with the
    partitions they can use there)."""
    context = {
        "clusters": clusters_summary.summarize(request.user),
        "gpu_count": GPUType.objects.count(),
        "model_count": ModelCard.objects.count(),
    }
    return render(request, "home.html", context)


@login_required
@require_http_methods(["GET", "POST"])
def launch_view(request: HtmxHttpRequest) -> HttpResponse:
    """The wizard. GET shows (and, when htmx asks, re-renders) the choices, estimate and options; POST launches."""
    if request.method == "POST":
        token = request.POST.get("token", "")
        try:
            session = actions.launch(request.user, request.POST, token)
        except ValidationError as exc:
            state = wizard.build(request.user, request.POST, errors=messages_of(exc))
            return render_page(request, "jobs/launch.html", {"w": state, "token": token})
        request.session[LAST_LAUNCH] = {name: request.POST.get(name, "") for name in ChoicesForm.base_fields}
        messages.success(request, "Session created: submitting it to Slurm.")
        return HttpResponseRedirect(reverse("jobs:sessions") + f"#s-{session.pk}")
    # The QueryDict itself: the adapters' checkboxes send several values of one name.
    params: Mapping[str, Any] = request.GET or dict(request.session.get(LAST_LAUNCH, {}))
    state = wizard.build(request.user, params)
    return render_page(request, "jobs/launch.html", {"w": state, "token": secrets.token_urlsafe(16)}, "wizard")


@login_required
@require_GET
def session_list(request: HtmxHttpRequest) -> HttpResponse:
    mine = with_relations().select_related("service").filter(owner_id=request.user.pk)
    sessions = list(sharing.with_shares(mine)[:100])
    sharing.annotate(sessions)
    shared = sharing.shared_with_me(request.user)
    usable = ModelService.objects.usable_by(request.user)
    context = {
        # The services the user may use (not refreshed with the cards: the page's own load shows them).
        "services": [] if request.htmx else list(usable.filter(stopped_at__isnull=True).with_ready()),
        "sessions": sessions,
        "live": bool(shared) or any(not s.is_ended for s in sessions),
        # A session about to run is shown Running within a second of it (the watch): refresh that often meanwhile.
        "refresh_s": 1 if any(s.state in (State.SUBMITTING, State.STARTING) for s in sessions) else 3,
        "shared": shared,
    }
    return render_page(request, "jobs/session_list.html", context, "cards")


def _card(request: HtmxHttpRequest, pk: UUID) -> Any:
    session = get_session_for(request, pk, sharing.with_shares(with_relations()))
    sharing.annotate([session])
    return session


@login_required
@require_GET
def session_card(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    return render_partial(request, "jobs/session_list.html", "card", {"s": _card(request, pk)})


@login_required
@require_GET
def session_detail(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    session = _card(request, pk)
    context = {"s": session, "events": session.events.all(), "form": sharing.ShareForm(request.user)}
    context["adapters"] = session.adapters.select_related("variant__model", "owner").order_by("pk")
    context["past_shares"] = session.shares.exclude(pk__in=[g.pk for g in session.active_shares])[:50]
    return render_page(request, "jobs/session_detail.html", context)


def _owned(request: HtmxHttpRequest, pk: UUID) -> Any:
    """Only the owner shares a session (support staff may look, not hand it on)."""
    session = get_session_for(request, pk)
    if session.owner_id != request.user.pk:
        raise Http404("no such session")
    return session


@login_required
@require_POST
def session_share(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    session = _owned(request, pk)
    form = sharing.ShareForm(request.user, request.POST)
    if session.is_ended:
        messages.error(request, "The session has ended: there is nothing to share.")
    elif form.is_valid():
        granted = sharing.share(session, request.user, form.cleaned_data)
        messages.success(request, "Shared with " + ", ".join(g.grantee for g in granted) + ".")
    else:
        for errors in form.errors.values():
            for error in errors:
                messages.error(request, str(error))
    return HttpResponseRedirect(reverse("jobs:session", args=[session.pk]) + "#sharing")


@login_required
@require_POST
def session_unshare(request: HtmxHttpRequest, pk: UUID, share_pk: int) -> HttpResponse:
    session = _owned(request, pk)
    if sharing.revoke(session.shares, share_pk):
        messages.info(request, "No longer shared: their next request is refused.")
    return HttpResponseRedirect(reverse("jobs:session", args=[session.pk]) + "#sharing")


@login_required
@require_POST
def session_cancel(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    session = get_session_for(request, pk)
    if not session.is_ended:
        actions.request_cancel(session, f"cancelled by {request.user.get_username()} in the browser")
        messages.info(request, "Cancelling: the job is being stopped.")
    if request.htmx:
        session.refresh_from_db()
        return render_page(request, "jobs/session_list.html", {"s": session}, "card")
    return HttpResponseRedirect(reverse("jobs:sessions"))


@login_required
@require_POST
def session_delete(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    session = get_session_for(request, pk)
    if session.state not in END_STATES:
        messages.error(request, "Only ended sessions can be deleted; cancel it first.")
    else:
        actions.delete(session)
        messages.info(request, "Session deleted.")
    if request.htmx:
        return HttpResponseClientRedirect(reverse("jobs:sessions"))
    return HttpResponseRedirect(reverse("jobs:sessions"))


@login_required
@require_GET
def session_relaunch(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    """The wizard again, with this session's choices and adapters."""
    session = get_session_for(request, pk)
    values = {**values_of(session, ChoicesForm), "adapter": session.adapter_names}
    query = urlencode({name: value for name, value in values.items() if value not in (None, "")})
    return HttpResponseRedirect(reverse("jobs:launch") + "?" + query)


@login_required
@require_GET
def session_log(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    """The job's log as the worker last fetched it; the page keeps asking while the session runs or it is coming."""
    session = get_session_for(request, pk)
    tail = actions.job_log(session)
    context = {"s": session, "tail": tail, "polling": not logs.is_final(session, tail)}
    return render_page(request, "jobs/session_log.html", context, "log")


@login_required
@require_GET
def cluster_accounts(request: HtmxHttpRequest) -> HttpResponse:
    me = request.user.pk
    accounts = {a.cluster_id: a for a in ClusterAccount.objects.filter(user_id=me).select_related("cluster")}
    shared = ClusterAccount.objects.filter(members__pk=me).select_related("cluster")
    for account in shared:
        accounts.setdefault(account.cluster_id, account)
    rows = [(cluster, accounts.get(cluster.pk)) for cluster in Cluster.objects.order_by("name")]
    return render_page(request, "jobs/accounts.html", {"rows": rows})


@login_required
@require_POST
def account_test(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """Log in as the account and ask Slurm something harmless; report success or the precise error."""
    account = ClusterAccount.objects.select_related("cluster").filter(pk=pk).first()
    me = request.user.pk
    if account is None or not (account.user_id == me or account.members.filter(pk=me).exists()):
        raise Http404("no such account")
    result = login.check(account)
    if request.htmx:
        context = {"account": account, "outcome": result.message, "ok": result.ok}
        return render_page(request, "jobs/accounts.html", context, "test-result")
    (messages.success if result.ok else messages.error)(request, result.message)
    return HttpResponseRedirect(reverse("jobs:accounts"))
