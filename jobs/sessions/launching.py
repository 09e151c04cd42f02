"""A launch's database part: the request validated by LaunchForm, the user's limits checked under a lock, the session
created with its first event. actions.launch() adds the submit, once the row is committed; a model service's keeper
(jobs/services/keep.py) creates its replicas here and has the tasks submit them, since it runs inside a task."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from jobs.allocations import check as allocations
from jobs.models import LLMSession, State
from jobs.sessions import limits
from jobs.sessions.forms import LaunchForm, form_errors


def create(
    user: User,
    data: Mapping[str, Any],
    request_token: str = "",
    *,
    replicas: int = 1,
    with_session: Callable[[LLMSession], object] | None = None,
) -> tuple[LLMSession, bool]:
    """The session a launch request makes, and whether it is new (a request_token seen before for this user returns
    that session instead of a second one). Inside a transaction: with_session adds what goes with the session in the
    same one; if it raises, nothing is created."""
    if request_token:
        earlier = LLMSession.objects.filter(owner=user, request_token=request_token).first()
        if earlier is not None:
            return earlier, False
    form = LaunchForm(data, user=user)
    if not form.is_valid():
        raise form_errors(form)
    columns = form.session_columns()
    if replicas > 1 and columns["nodes"] > 1:
        raise ValidationError({"nodes": "A batch launch with replicas runs each on one node; ask for 1 node."})
    try:
        with transaction.atomic():
            # Checked again under a lock on the user: two launches at once cannot both take the last place.
            User.objects.select_for_update().filter(pk=user.pk).first()
            gpus = columns["gpus_per_node"] * columns["nodes"] * replicas
            limits.check(user, columns["cluster"], gpus)
            account, cluster = columns["account"], columns["cluster"]
            allocations.check_launch(user, account, cluster, gpus, columns["walltime_min"], lock=True)
            session = LLMSession.objects.create(owner=user, request_token=request_token, **columns)
            session.adapters.set(form.adapters)
            session.events.create(to_state=State.PENDING, cause=f"requested by {user.get_username()}")
            if with_session is not None:
                with_session(session)
    except IntegrityError:
        if not request_token:
            raise
        return LLMSession.objects.get(owner=user, request_token=request_token), False  # the other submit won the race
    return session, True
