"""A session's measured figures: what its server said it allocated and how fast it answered (jobs/cluster/measured.py
reads them from the job's log), kept on the session (LLMSession.measured) for its page and `sessions show --json`.

The worker (jobs.tasks.measure_sessions, on beat) reads them once a session's server is ready, again every
MEASURE_EVERY while it runs (the speeds grow with its requests) and once after it ended (its last requests), one
bounded SSH command a session. A cluster that cannot be reached leaves the figures as they were, to be read at the
next round. Speeds come from the server's own per-request timings where its log has them (llama-server); where it
does not (vLLM logs only throughput over intervals, transformers nothing), from the proxy's records of the
session's requests (ProxyRequest: generation tokens over the time after the first token, prompt tokens over the time
to it), which include the network between the portal and the node. The same figures are kept for the catalog as the
site's measurement of the session's choices (keep_for_the_site), which the wizard, the estimate command and the
plans show beside the estimate (catalog/measured.py).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import ExpressionWrapper, F, FloatField, Q, Sum
from django.utils import timezone

from catalog.models import SiteMeasurement
from jobs.cluster import measured
from jobs.models import END_STATES, LLMSession, ProxyRequest, Purpose, State
from portal import ssh

log = logging.getLogger(__name__)

MEASURE_EVERY = timedelta(minutes=10)  # how often a running session's figures are read again
AFTER_END = timedelta(days=1)  # an ended session not read since its end is read within this long, then left
MAX_A_ROUND = 50  # sessions read by one round; the rest wait for the next


def due() -> list[LLMSession]:
    """Sessions whose figures should be read now: running and ready but never read, or not for MEASURE_EVERY; ended
    after being ready and not read since (within AFTER_END of the end). Those never read come first."""
    now = timezone.now()
    running = Q(state=State.RUNNING, ready_at__isnull=False) & (
        Q(measured_at__isnull=True) | Q(measured_at__lt=now - MEASURE_EVERY)
    )
    ended = Q(state__in=END_STATES, ready_at__isnull=False, ended_at__gte=now - AFTER_END) & (
        Q(measured_at__isnull=True) | Q(measured_at__lte=F("ended_at"))
    )
    rows = LLMSession.objects.filter(running | ended).exclude(job_id="").select_related("account__cluster", "runtime")
    return list(rows.order_by(F("measured_at").asc(nulls_first=True))[:MAX_A_ROUND])


def measure(session: LLMSession) -> dict[str, Any] | None:
    """Read the session's figures from its job's log and keep them (when they changed); None when the cluster could
    not be asked."""
    account = session.account
    try:
        result = account.run(
            measured.measure_command(str(session.pk), gated=account.restricted),
            timeout_s=30,
            max_output_bytes=measured.MAX_OUTPUT_BYTES,
        )
    except ssh.SSHError as exc:
        log.info("cannot read the measured figures of %s: %s", session.pk, exc)
        return None
    figures = measured.parse(result.stdout) if result.ok else {}
    if not ("prompt_tokens_per_s" in figures or "tokens_per_s" in figures):
        figures = measured.clean({**figures, **proxy_speeds(session)})
    now = timezone.now()
    with transaction.atomic():
        LLMSession.objects.filter(pk=session.pk).update(measured=figures, measured_at=now)
        keep_for_the_site(session, figures, now)
    return figures


def keep_for_the_site(session: LLMSession, figures: dict[str, Any], at: datetime) -> None:
    """The figures as the site's measurement of the session's choices (the catalog's SiteMeasurement), which every
    estimate of the same choices shows beside it. An embeddings server is sized otherwise: it counts for nothing."""
    if session.purpose == Purpose.EMBEDDINGS:
        figures = {}
    devices = figures.get("devices") or {}
    SiteMeasurement.keep(
        f"session:{session.pk}", figures, at,
        variant_id=session.variant_id, runtime=session.runtime.kind, context=session.context_length,
        parallel=session.parallel, gpu_type_id=session.gpu_type_id, gpus_per_node=session.gpus_per_node,
        nodes=session.nodes, on_host=bool(devices) and all(measured.is_host(device) for device in devices),
        total_from=figures.get("total_from", ""),
    )  # fmt: skip


def measure_due() -> int:
    """One round: every due session read in turn. Returns how many were read."""
    return sum(measure(session) is not None for session in due())


def proxy_speeds(session: LLMSession) -> dict[str, float]:
    """Tokens per second from the proxy's records of the session's answered requests: generated tokens over the
    time after the first token (ProxyRequest.tokens_per_s), prompt tokens not read from a cache over the time to the
    first token (streams only); each weighted by its tokens."""
    answered = ProxyRequest.objects.filter(session=session, status__lt=400, tokens_reported=True)
    seconds = ExpressionWrapper(F("completion_tokens") * 1.0 / F("tokens_per_s"), output_field=FloatField())
    generated = answered.filter(tokens_per_s__gt=0, completion_tokens__gt=1).aggregate(
        tokens=Sum("completion_tokens"), seconds=Sum(seconds)
    )
    computed = ExpressionWrapper(F("prompt_tokens") - F("cached_tokens"), output_field=FloatField())
    prompts = answered.filter(ttft_ms__gt=0, prompt_tokens__gt=F("cached_tokens")).aggregate(
        tokens=Sum(computed), ms=Sum("ttft_ms")
    )
    speeds = {}
    if generated["tokens"] and generated["seconds"]:
        speeds["tokens_per_s"] = generated["tokens"] / generated["seconds"]
    if prompts["tokens"] and prompts["ms"]:
        speeds["prompt_tokens_per_s"] = prompts["tokens"] / (prompts["ms"] / 1000)
    return speeds
