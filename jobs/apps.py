from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate

SUPPORT_GROUP = "Session support"  # the group an admin puts support staff in (docs/admin-guide.md)


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Sessions"

    def ready(self) -> None:
        post_migrate.connect(ensure_support_group, sender=self)


def ensure_support_group(sender: AppConfig, using: str = "default", **kwargs: Any) -> None:
    """The "Session support" group, holding the permission to see every user's sessions: an admin grants it by
    adding someone to the group. Runs after every migrate (after auth has created the permission)."""
    from django.contrib.auth.models import Group, Permission

    from jobs.models import SEE_ALL_SESSIONS

    app_label, codename = SEE_ALL_SESSIONS
    permission = Permission.objects.using(using).filter(content_type__app_label=app_label, codename=codename).first()
    if permission is not None:
        group, _ = Group.objects.using(using).get_or_create(name=SUPPORT_GROUP)
        group.permissions.add(permission)
