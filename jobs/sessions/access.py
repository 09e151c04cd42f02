"""Who may see a session, and finding one: the ownership rule every page that touches a session uses (its owner, and
support staff with the explicit permission), and the command line's lookup by uuid prefix. The API proxy applies the
same rule in SQL: jobs/use/targets.py."""

from __future__ import annotations

import re
from uuid import UUID

from django.contrib.auth.models import AnonymousUser, User
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import Http404, HttpRequest

from jobs.models import SEE_ALL_SESSIONS, LLMSession

_UUID_PREFIX = re.compile(r"[0-9a-f-]{4,36}\Z")


def with_relations() -> QuerySet[LLMSession]:
    """Sessions with what their cards show, in one query (and one more for their batch runs)."""
    return LLMSession.objects.select_related(
        "owner", "cluster", "partition", "gpu_type", "variant__model", "runtime", "account__cluster"
    ).prefetch_related("batch_runs")


def sees_all(user: User | AnonymousUser) -> bool:
    """Support staff: those given the explicit permission (superusers have every permission)."""
    return user.has_perm(".".join(SEE_ALL_SESSIONS))


def get_session_for(request: HttpRequest, pk: UUID | str) -> LLMSession:
    """The session if the request's user owns it or sees all sessions; 404 otherwise, so others cannot even probe
    ids."""
    try:
        session = with_relations().get(pk=pk)
    except (LLMSession.DoesNotExist, ValidationError, ValueError):
        raise Http404("no such session") from None
    if session.owner_id != request.user.pk and not sees_all(request.user):
        raise Http404("no such session")
    return session


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
