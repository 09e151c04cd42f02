"""What one user may hold on a cluster at a time: live sessions and fine-tune runs (together), and the GPUs they
hold (a run trains on its GPU as a session serves on its). The cluster's own limits (catalog) win over the site's
defaults (settings); neither set means no limit."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db.models import F, Sum

from catalog.models import Cluster
from jobs.models import LIVE_STATES, FineTuneRun, LLMSession


def check(user: User, cluster: Cluster, gpus: int) -> None:
    """Refuse, with the limit and what is in use, a launch (a session's, or a fine-tune run's through its launch
    fields) that would take the user past a limit."""
    live = LLMSession.objects.filter(owner=user, cluster=cluster, state__in=LIVE_STATES)
    runs = FineTuneRun.objects.filter(owner=user, cluster=cluster, state__in=FineTuneRun.LIVE_STATES)
    max_sessions = cluster.max_sessions_per_user or settings.PORTAL_MAX_SESSIONS_PER_USER
    if max_sessions:
        # A live fine-tune run is a job holding a place on the cluster as a session is: it counts here too.
        count, training_runs = live.count(), runs.count()
        if count + training_runs >= max_sessions:
            sessions = f"{count} live session{'s' if count != 1 else ''}"
            if training_runs:
                sessions += f" and {training_runs} live fine-tune run{'s' if training_runs != 1 else ''}"
                sessions += " (a fine-tune run counts as a session)"
            message = f"You have {sessions} on {cluster.name}, the most one user may have there; cancel one first."
            raise ValidationError({"cluster": message})
    max_gpus = cluster.max_gpus_per_user or settings.PORTAL_MAX_GPUS_PER_USER
    if max_gpus:
        serving = live.aggregate(gpus=Sum(F("gpus_per_node") * F("nodes")))["gpus"] or 0
        training = runs.aggregate(gpus=Sum("gpus_per_node"))["gpus"] or 0
        if serving + training + gpus > max_gpus:
            more = f"{gpus} more GPU{'s' if gpus != 1 else ''}"
            total = f"{serving + training + gpus} in use on {cluster.name}"
            held = f" ({serving} held by your sessions, {training} by your fine-tune runs)" if training else ""
            message = f"{more} would make {total}{held}; one user may hold at most {max_gpus} there."
            raise ValidationError({"gpus": message})
