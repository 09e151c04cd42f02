from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_delete, post_migrate

SUPPORT_GROUP = "Session support"  # the group an admin puts support staff in (docs/admin-guide.md)
USAGE_GROUP = "Site usage"  # those who see every user's usage and the site dashboard, not their sessions


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Sessions"

    def ready(self) -> None:
        post_migrate.connect(ensure_support_group, sender=self)
        from django.conf import settings

        from jobs.models import LLMSession
        from jobs.usage import rollups

        # Their summaries go with them (on_delete CASCADE): a new revision of the summaries.
        for model in (LLMSession, settings.AUTH_USER_MODEL):
            post_delete.connect(rollups.deleted_with_summaries, sender=model, dispatch_uid=f"usage-deleted-{model}")
        from jobs import gatekeeping

        gatekeeping.install()  # a restricted key's gate, installed on first use (portal/gate.py)


def ensure_support_group(sender: AppConfig, using: str = "default", **kwargs: Any) -> None:
    """The "Session support" group, holding the permission to see every user's sessions, and the "Site usage" group,
    holding the permission to see the site's usage: an admin grants either by adding someone to the group. Runs after
    every migrate (after auth has created the permissions)."""
    from django.contrib.auth.models import Group, Permission

    from jobs.models import SEE_ALL_SESSIONS, SEE_SITE_USAGE

    for name, (app_label, codename) in ((SUPPORT_GROUP, SEE_ALL_SESSIONS), (USAGE_GROUP, SEE_SITE_USAGE)):
        found = Permission.objects.using(using).filter(content_type__app_label=app_label, codename=codename).first()
        if found is not None:
            group, _ = Group.objects.using(using).get_or_create(name=name)
            group.permissions.add(found)
