"""The jobs app's models, by concern: sessions and their events (sessions.py), partition state (capacity.py), API
and scrape tokens (tokens.py), chat (chat.py), batch runs, their events and the pace finished runs measured
(batch.py), fine-tune runs (finetune.py) and their comparisons (comparisons.py), sharing (sharing.py), usage
(usage.py), allocations (allocations.py), the counts every web process shares (counts.py).

May import: catalog, portal. Never the rest of jobs.
"""

from jobs.models.allocations import Allocation
from jobs.models.batch import BatchEvent, BatchFile, BatchRun, Pace, measured_pace, transition_run
from jobs.models.capacity import PartitionState
from jobs.models.chat import ChatMessage, Conversation
from jobs.models.comparisons import FineTuneComparison
from jobs.models.counts import InFlight, SharedCount
from jobs.models.finetune import FineTuneEvent, FineTuneRun, TrainingRuntime, transition_finetune
from jobs.models.services import RUN_SITE_SERVICE, ModelService, ReplicaLoad
from jobs.models.sessions import (
    END_STATES,
    LIVE_STATES,
    OWNER_SEPARATOR,
    POLLED_STATES,
    SEE_ALL_SESSIONS,
    SEE_SITE_USAGE,
    SERVING_STATES,
    LLMSession,
    Purpose,
    SessionEvent,
    State,
    served_model_name,
    transition,
)
from jobs.models.sharing import FineTuneShare, GroupSource, SessionShare, active_shares, granted_to, reaching
from jobs.models.tokens import ApiToken, ScrapeToken, token_digest
from jobs.models.usage import (
    SITE_USAGE_DENIED,
    SPEED_BOUNDS,
    TTFT_BOUNDS_MS,
    ProxyRequest,
    UsageRollup,
    UsageWatermark,
    UsageWindow,
    sees_site_usage,
)

__all__ = [
    "END_STATES",
    "LIVE_STATES",
    "OWNER_SEPARATOR",
    "POLLED_STATES",
    "RUN_SITE_SERVICE",
    "SEE_ALL_SESSIONS",
    "SEE_SITE_USAGE",
    "SERVING_STATES",
    "SITE_USAGE_DENIED",
    "SPEED_BOUNDS",
    "TTFT_BOUNDS_MS",
    "Allocation",
    "ApiToken",
    "BatchEvent",
    "BatchFile",
    "BatchRun",
    "ChatMessage",
    "Conversation",
    "FineTuneComparison",
    "FineTuneEvent",
    "FineTuneRun",
    "FineTuneShare",
    "GroupSource",
    "InFlight",
    "LLMSession",
    "ModelService",
    "Pace",
    "PartitionState",
    "ProxyRequest",
    "Purpose",
    "ReplicaLoad",
    "ScrapeToken",
    "SessionEvent",
    "SessionShare",
    "SharedCount",
    "State",
    "TrainingRuntime",
    "UsageRollup",
    "UsageWatermark",
    "UsageWindow",
    "active_shares",
    "granted_to",
    "measured_pace",
    "reaching",
    "sees_site_usage",
    "served_model_name",
    "token_digest",
    "transition",
    "transition_finetune",
    "transition_run",
]
