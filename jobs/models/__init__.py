"""The jobs app's models, by concern: sessions and their events (sessions.py), partition state (capacity.py), API
tokens (tokens.py), chat (chat.py), batch runs (batch.py).

May import: catalog, portal. Never the rest of jobs.
"""

from jobs.models.batch import BatchFile, BatchRun
from jobs.models.capacity import PartitionState
from jobs.models.chat import ChatMessage, Conversation
from jobs.models.sessions import (
    END_STATES,
    LIVE_STATES,
    POLLED_STATES,
    SEE_ALL_SESSIONS,
    SERVING_STATES,
    LLMSession,
    Purpose,
    SessionEvent,
    State,
    served_model_name,
    transition,
)
from jobs.models.tokens import ApiToken, token_digest

__all__ = [
    "END_STATES",
    "LIVE_STATES",
    "POLLED_STATES",
    "SEE_ALL_SESSIONS",
    "SERVING_STATES",
    "ApiToken",
    "BatchFile",
    "BatchRun",
    "ChatMessage",
    "Conversation",
    "LLMSession",
    "PartitionState",
    "Purpose",
    "SessionEvent",
    "State",
    "served_model_name",
    "token_digest",
    "transition",
]
