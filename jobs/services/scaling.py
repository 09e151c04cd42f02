"""How many replicas a service keeps now, within min..max, from the requests in flight on its ready replicas (the sum
over every portal process: load.py). Plain rules, applied by the keeper each round:

- Up: when the requests in flight per ready replica have stayed above the service's target for SCALE_UP_AFTER, it
  keeps as many as the load needs (ceil(in flight / target), the Kubernetes autoscaler's rule), up to max. Replicas
  still starting are counted as kept, so a burst is not answered with a replica per round.
- Down: once one replica fewer would have held every request in flight within the target for the service's idle
  time, it keeps one fewer (one step per idle time), down to min. The last replica of a service with min 0 goes only
  when no request has reached any replica for the idle time.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from jobs.models import LLMSession, ModelService

SCALE_UP_AFTER = timedelta(seconds=15)  # a burst shorter than this is absorbed by the replicas there are


def decide(service: ModelService, ready: list[LLMSession], inflight: dict[str, int], now: datetime) -> None:
    """Update the service's kept count (desired_replicas) and the moments it tracks (busy_since, quiet_since)."""
    keeps = service.keeps
    total = sum(inflight.get(str(r.pk), 0) for r in ready)
    busy = bool(ready) and total > service.target_inflight * len(ready)
    quiet = total <= service.target_inflight * (keeps - 1) and keeps > service.min_replicas
    if quiet and keeps == 1:  # the last one: only when it is ready and nothing has used it for the idle time
        last = max((r.last_activity_at or r.ready_at or r.created_at for r in ready), default=None)
        quiet = total == 0 and last is not None and now - last >= timedelta(minutes=service.idle_minutes)
    desired = keeps
    busy_since = (service.busy_since or now) if busy else None
    quiet_since = (service.quiet_since or now) if quiet else None
    if busy_since is not None and now - busy_since >= SCALE_UP_AFTER:
        desired = max(keeps, min(service.max_replicas, math.ceil(total / service.target_inflight)))
        busy_since = None
    if quiet_since is not None and now - quiet_since >= timedelta(minutes=service.idle_minutes):
        desired = keeps - 1
        quiet_since = now  # the next step down after another idle time
    changed = (desired, busy_since, quiet_since) != (service.keeps, service.busy_since, service.quiet_since)
    if changed:
        service.desired_replicas, service.busy_since, service.quiet_since = desired, busy_since, quiet_since
        service.save(update_fields=["desired_replicas", "busy_since", "quiet_since"])
