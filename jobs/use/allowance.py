"""A token's requests a minute (its own rate where it has one, else PORTAL_API_REQUESTS_PER_MINUTE), and its user's,
all their tokens together (PORTAL_API_USER_REQUESTS_PER_MINUTE).

Both are counted in the store every web process shares (jobs/models/counts.py: Redis where configured, else the
database), all or none, so that the limits hold across any number of workers and hosts: a request refused by one
count counts in neither. The door asks in the trip to the proxy's threads it makes anyway to look the token up
(guard._api_door), so counting adds a round trip to the store but no thread hop.
"""

from __future__ import annotations

from django.conf import settings

from jobs.models.counts import take
from jobs.use.targets import Holder


def per_token(holder: Holder) -> int:
    """The token's own rate where it has one (never above the site's, checked when it was issued), else the site's."""
    return holder.requests_per_minute or settings.PORTAL_API_REQUESTS_PER_MINUTE


def refusal(holder: Holder) -> tuple[str, int] | None:
    """Count one more request of the token and of its user in this minute; None while both are within their limits,
    else what the 429 says (which limit was reached) and the seconds until the next minute (Retry-After)."""
    if holder.token_pk is None:
        return None
    per_user = settings.PORTAL_API_USER_REQUESTS_PER_MINUTE
    full = take([(f"api-token:{holder.token_pk}", per_token(holder)), (f"api-user:{holder.user_pk}", per_user)])
    if full is None:
        return None
    if full.index == 0:
        return f"this token made more than {per_token(holder)} requests a minute", full.wait_s
    return f"your tokens together made more than {per_user} requests a minute", full.wait_s
