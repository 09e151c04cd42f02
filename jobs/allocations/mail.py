"""Mails at an allocation's soft threshold and when it is spent: to its user and its managers, once per period each
(the allocation's row is claimed with a conditional UPDATE first, so two workers never both send)."""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.mail import send_mail
from django.db.models import Q

from jobs.allocations import report, spend
from jobs.models import Allocation

log = logging.getLogger(__name__)


def send_due() -> int:
    """Every mail due now; how many were sent."""
    sent = 0
    for standing in report.of_site():
        start = standing.window.start
        if standing.spent and _claim(standing.allocation, "spent_mailed_for", start):
            sent += _mail(standing, "spent")
        elif standing.soft and _claim(standing.allocation, "soft_mailed_for", start):
            sent += _mail(standing, f"at {standing.allocation.soft_percent}%")
    return sent


def _claim(allocation: Allocation, field: str, start: object) -> bool:
    unclaimed = Q(**{f"{field}__isnull": True}) | ~Q(**{field: start})
    return bool(Allocation.objects.filter(unclaimed, pk=allocation.pk).update(**{field: start}))


def recipients(allocation: Allocation) -> list[str]:
    people = list(allocation.managers.all())
    if allocation.user is not None:
        people.insert(0, allocation.user)
    return sorted({p.email for p in people if p.email and p.is_active})


def _mail(standing: spend.Standing, what: str) -> int:
    allocation = standing.allocation
    to = recipients(allocation)
    if not to:
        log.info("allocation %s is %s; nobody to mail (no user holder or managers with an email)", allocation.pk, what)
        return 0
    action = (
        "New launches that do not fit and API and chat calls are refused until it resets."
        if allocation.action == Allocation.Action.REFUSE
        else "Nothing is refused: this allocation only warns."
    )
    subject = f"Allocation of {allocation.holder_label}: {what}"
    body = f"{report.line(standing)}.\n\n{action}\n\n{settings.PORTAL_BASE_URL}/usage/\n"
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, to)
    except OSError as exc:  # a mail server that is down must not break the beat
        log.warning("could not mail %s about allocation %s: %s", to, allocation.pk, exc)
        field = "spent_mailed_for" if standing.spent else "soft_mailed_for"
        Allocation.objects.filter(pk=allocation.pk).update(**{field: None})  # tried again at the next beat
        return 0
    return 1
