"""Sharing a fine-tune run's adapter (docs/finetune.md, sharing): its owner grants named users or a group, until they
revoke it or it expires, the run's page (read-only), the adapter's download and loading it in their own sessions of
the base model. Whom a grant may name is the sessions' rule (jobs/sessions/sharing.py GrantForm); so are the grant's
making and revoking. The launch's own check of a shared adapter is jobs/sessions/forms.py's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.contrib.auth.models import AnonymousUser, User
from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from jobs.models import FineTuneRun, FineTuneShare, active_shares, reaching
from jobs.sessions import sharing


class AdapterShareForm(sharing.GrantForm):
    thing = "run"


def share(run: FineTuneRun, by: User, data: dict[str, Any]) -> list[FineTuneShare]:
    """Grants from a valid AdapterShareForm; only a completed run has an adapter to share."""
    if run.state != FineTuneRun.State.COMPLETED:
        raise ValidationError(f"The run is {run.state}: only a completed run has an adapter to share.")
    return sharing.grant(run.shares, by, data)


def revoke(run: FineTuneRun, share_pk: Any) -> bool:
    """Stop a grant now: the grantees no longer see the run, download its adapter or launch with it. Sessions that
    loaded it before keep it until they end (the copy in their server's memory is theirs)."""
    return sharing.revoke(run.shares, share_pk)


def granted_runs(user: User | AnonymousUser) -> QuerySet[FineTuneRun]:
    """The completed runs others shared with `user` (by name or through a group) in a grant in force now."""
    if not user.is_authenticated:
        return FineTuneRun.objects.none()
    assert isinstance(user, User)
    grants = FineTuneShare.objects.filter(reaching(user)).values("run")
    return (
        FineTuneRun.objects.filter(pk__in=grants, state=FineTuneRun.State.COMPLETED)
        .exclude(owner=user.pk)
        .select_related("variant__model", "owner", "account", "cluster")
    )


def grants_of(run: FineTuneRun) -> tuple[list[FineTuneShare], list[FineTuneShare]]:
    """The run's grants in force, and the 50 latest of the others (revoked or expired), for its page."""
    grants = run.shares.select_related("user", "group")
    in_force = list(grants.filter(active_shares()))
    earlier = grants.exclude(pk__in=[g.pk for g in in_force]).order_by("-created_at", "-pk")[:50]
    return in_force, list(earlier)


@dataclass
class SharedRun:
    """A run someone shared with me, and until when the latest of the grants that reach me runs (None: revoked)."""

    run: FineTuneRun
    expires_at: datetime | None


def shared_with_me(user: User) -> list[SharedRun]:
    """The completed runs others shared with `user`, newest first (one query however many)."""
    grants = (
        FineTuneShare.objects.filter(reaching(user), run__state=FineTuneRun.State.COMPLETED)
        .exclude(run__owner=user.pk)
        .select_related("run__variant__model", "run__owner")
        .order_by("-run__created_at")
    )
    found: dict[Any, SharedRun] = {}
    for grant in grants:
        entry = found.setdefault(grant.run_id, SharedRun(grant.run, grant.expires_at))
        if entry.expires_at is not None and (grant.expires_at is None or grant.expires_at > entry.expires_at):
            entry.expires_at = grant.expires_at
    return list(found.values())
