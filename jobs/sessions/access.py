"""Who may see a session, and finding one: the ownership rule every page that touches a session uses (its owner, and
support staff with the explicit permission), the narrower rule of the pages a session is shared for (its chat), and
the command line's lookup by uuid prefix. The API proxy applies the same rules in SQL: jobs/use/targets.py."""

from __future__ import annotations

import re
from uuid import UUID

from django.contrib.auth.models import AnonymousUser, User
from django.core.exceptions import ValidationError
from django.db.models import Prefetch, QuerySet
from django.http import Http404, HttpRequest

from jobs.models import SEE_ALL_SESSIONS, FineTuneRun, LLMSession, granted_to

_UUID_PREFIX = re.compile(r"[0-9a-f-]{4,36}\Z")


def with_relations() -> QuerySet[LLMSession]:
    """Sessions with what their cards show, in one query (and one more for their batch runs); those their owner
    deleted are gone from every page (the site's usage still counts them)."""
    return (
        LLMSession.objects.filter(deleted_at__isnull=True)
        .select_related("owner", "cluster", "partition", "gpu_type", "variant__model", "runtime", "account__cluster")
        .prefetch_related("batch_runs")
    )


def with_adapters(sessions: QuerySet[LLMSession]) -> QuerySet[LLMSession]:
    """The sessions with their adapters and what the adapters' model names read, in one more query however many."""
    runs = FineTuneRun.objects.select_related("variant__model", "owner")
    return sessions.prefetch_related(Prefetch("adapters", queryset=runs))


def sees_all(user: User | AnonymousUser) -> bool:
    """Support staff: those given the explicit permission (superusers have every permission)."""
    return user.has_perm(".".join(SEE_ALL_SESSIONS))


def get_session_for(request: HttpRequest, pk: UUID | str, sessions: QuerySet[LLMSession] | None = None) -> LLMSession:
    """The session if the request's user owns it or sees all sessions; 404 otherwise, so others cannot even probe
    ids. `sessions` is where to look, with what the page needs loaded (default: with_relations())."""
    try:
        session = (with_relations() if sessions is None else sessions).get(pk=pk)
    except (LLMSession.DoesNotExist, ValidationError, ValueError):
        raise Http404("no such session") from None
    if session.owner_id != request.user.pk and not sees_all(request.user):
        raise Http404("no such session")
    return session


def shared_with(user: User | AnonymousUser, *, chat: bool = False, api: bool = False) -> QuerySet[LLMSession]:
    """The sessions others shared with `user` (by name or through a group) in a grant in force now, for the browser
    chat, the API, or either when neither is asked for."""
    if not user.is_authenticated:
        return LLMSession.objects.none()
    grants = granted_to(user)
    if chat:
        grants = grants.filter(chat=True)
    if api:
        grants = grants.filter(api=True)
    return with_relations().filter(pk__in=grants.values("session")).exclude(owner=user.pk)


def get_session_to_chat(request: HttpRequest, pk: UUID | str) -> tuple[LLMSession, bool]:
    """The session if the request's user may chat with it: its owner, support staff, or someone it is shared with
    for the chat. The second value says whether they see every conversation on it (support staff only; the owner
    and those it is shared with see their own). 404 otherwise."""
    try:
        session = with_relations().get(pk=pk)
    except (LLMSession.DoesNotExist, ValidationError, ValueError):
        raise Http404("no such session") from None
    if session.owner_id == request.user.pk:
        return session, False
    if sees_all(request.user):
        return session, True
    if shared_with(request.user, chat=True).filter(pk=session.pk).exists():
        return session, False
    raise Http404("no such session")


def find_session(text: str) -> LLMSession:
    """A session by uuid or a unique prefix of it (as the command line prints them)."""
    text = text.strip().lower()
    if not _UUID_PREFIX.match(text):
        raise ValidationError(f"{text!r} is not a session id.")
    lookup = {"pk": text} if len(text) == 36 else {"id__startswith": text}
    matches = list(with_relations().filter(**lookup)[:2])
    if len(matches) != 1:
        raise ValidationError(f"No single session matches {text!r}.")
    return matches[0]
