"""Sharing a session: the owner grants named users or a group the browser chat, the API, or both, until they revoke
it or it expires; and what the pages show of it (who it is shared with, how many requests each made, what others
shared with me). Who may then reach the session is decided in access.py and, for the proxy, in jobs/use/targets.py."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from django import forms
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, User
from django.db import models, transaction
from django.db.models import Prefetch, QuerySet
from django.utils import timezone

from jobs.models import END_STATES, FineTuneShare, LLMSession, SessionShare, active_shares, granted_to
from jobs.usage import figures

MAX_NAMES = 50  # users named in one grant
AnyGrant = TypeVar("AnyGrant", SessionShare, FineTuneShare)


class GrantForm(forms.Form):
    """Whom a grant names and until when: users of the owner's groups and one of those groups, checked the same way
    for everything an owner shares (a session here, a fine-tune run's adapter in jobs/finetune/sharing.py)."""

    thing = "session"  # what is shared, as the form's messages name it

    users = forms.CharField(
        required=False,
        max_length=2000,
        help_text="User names of members of your groups, separated by commas or spaces.",
    )
    group = forms.ModelChoiceField(queryset=Group.objects.none(), required=False, empty_label="(no group)")
    days = forms.IntegerField(
        required=False, min_value=1, max_value=365, label="expires after (days)", help_text="Empty: until revoked."
    )

    def __init__(self, owner: User, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = owner
        group_field = self.fields["group"]
        assert isinstance(group_field, forms.ModelChoiceField)
        # A lab shares with its own group: the owner's groups (an admin's: any).
        group_field.queryset = Group.objects.all() if owner.is_superuser else owner.groups.all()

    def clean_users(self) -> list[User]:
        """The users named, each an active member of one of the owner's groups (an admin's: anyone active).

        Someone outside those groups gets the same answer as a name nobody has, so the form cannot be used to find
        out which user names exist; the members of one's own groups are no secret (a lab shares with its group)."""
        names = [name for name in str(self.cleaned_data.get("users") or "").replace(",", " ").split() if name]
        if len(names) > MAX_NAMES:
            raise forms.ValidationError(f"Name at most {MAX_NAMES} users at once, or share with a group.")
        if self.owner.get_username() in names:
            raise forms.ValidationError(f"The {self.thing} is yours already: name others.")
        reachable = get_user_model().objects.filter(username__in=names, is_active=True)
        if not self.owner.is_superuser:
            reachable = reachable.filter(groups__in=self.owner.groups.all()).distinct()
        found = {u.get_username(): u for u in reachable}
        unknown = sorted({name for name in names if name not in found})
        if unknown:
            raise forms.ValidationError(
                f"None of your groups has a member called {', '.join(unknown)}: name members of your groups, or "
                "share with one of your groups."
            )
        return list(found.values())

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if not data.get("users") and not data.get("group") and not self.errors:
            raise forms.ValidationError("Name users or choose a group to share with.")
        return data


class ShareForm(GrantForm):
    chat = forms.BooleanField(required=False, initial=True, label="chat in the browser")
    api = forms.BooleanField(required=False, initial=True, label="API (scripts)")
    field_order = ["users", "group", "chat", "api", "days"]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if not data.get("chat") and not data.get("api"):
            raise forms.ValidationError("Share the chat, the API, or both.")
        return data


def share(session: LLMSession, by: User, data: dict[str, Any]) -> list[SessionShare]:
    """Grants from a valid ShareForm: one per user and one for the group."""
    return grant(session.shares, by, data, chat=bool(data["chat"]), api=bool(data["api"]))


def grant(shares: models.Manager[AnyGrant], by: User, data: dict[str, Any], **access: Any) -> list[AnyGrant]:
    """Grants from a valid GrantForm through `shares` (the related manager of what is shared), one per user and one
    for the group, with `access` (a grant's own columns). A grantee who already holds a grant in force gets the new
    one in its place (their access is what the owner chose last)."""
    now = timezone.now()
    expires = now + timedelta(days=data["days"]) if data.get("days") else None
    grantees = [{"user": user} for user in data.get("users") or []]
    grantees += [{"group": data["group"]}] if data.get("group") else []
    created = []
    with transaction.atomic():
        for grantee in grantees:
            shares.filter(active_shares(now), **grantee).update(revoked_at=now)
            created.append(shares.create(created_by=by, expires_at=expires, **grantee, **access))
    return created


def revoke(shares: models.Manager[AnyGrant], share_pk: Any) -> bool:
    """Stop a grant in `shares` now: the next request of those it reached is refused (the proxy checks every
    request, a launch every adapter)."""
    try:
        pk = int(share_pk)
    except (TypeError, ValueError):
        return False
    return bool(shares.filter(pk=pk, revoked_at__isnull=True).update(revoked_at=timezone.now()))


def with_shares(sessions: QuerySet[LLMSession]) -> QuerySet[LLMSession]:
    """Sessions with their grants in force (and whom they name) in one more query."""
    grants = SessionShare.objects.filter(active_shares()).select_related("user", "group")
    return sessions.prefetch_related(Prefetch("shares", queryset=grants, to_attr="active_shares"))


def annotate(sessions: list[LLMSession]) -> None:
    """Sets `use` on each session for its card: who made how many requests on it and their tokens (usage Rows,
    most requests first); three queries."""
    found = figures.by_user_on_session([s.pk for s in sessions])
    for s in sessions:
        s.use = found.get(s.pk, [])  # type: ignore[attr-defined]


@dataclass
class SharedSession:
    """A session someone shared with me, with what the grants that reach me allow."""

    session: LLMSession
    chat: bool
    api: bool
    expires_at: Any


def shared_with_me(user: User) -> list[SharedSession]:
    """The live sessions others shared with `user`, newest first (two queries)."""
    grants = (
        granted_to(user)
        .exclude(session__owner=user.pk)
        .filter(session__deleted_at__isnull=True)
        .exclude(session__state__in=END_STATES)
        .select_related("session__owner", "session__cluster", "session__variant__model", "session__gpu_type")
        .select_related("session__runtime", "session__partition")
        .order_by("-session__created_at")
    )
    found: dict[Any, SharedSession] = {}
    for grant in grants:
        entry = found.setdefault(grant.session_id, SharedSession(grant.session, False, False, grant.expires_at))
        entry.chat |= grant.chat
        entry.api |= grant.api
        if entry.expires_at is not None and (grant.expires_at is None or grant.expires_at > entry.expires_at):
            entry.expires_at = grant.expires_at  # the latest of the grants that reach me
    return list(found.values())
