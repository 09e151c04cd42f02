"""Where a fine-tune run trains when its caller does not say (OpenAI's fine-tuning API without a placement in its
metadata): the wizard's first plan for the method that fits one GPU of a partition the user's accounts may use, as
the wizard lists it (recommended first: idle GPUs, then the soonest start), at the run's sequence length.

The wizard decides, so a run made here lands where a researcher following the wizard's first *Fine-tune here* link
would put it; the run's own form then checks it as every run's (limits, allocations, the estimate at its batch size).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from django.contrib.auth.models import User

from jobs.sessions import wizard

# The placement fields a plan's Fine-tune link carries (wizard._finetune_query), taken from it as they are.
PLACED = ("cluster", "partition", "gpu", "gpus", "walltime")


def recommended(user: User, model: str, method: str, max_seq_length: int | None = None) -> dict[str, Any] | None:
    """The placement fields of the wizard's first plan for `method` that fits, or None when none does."""
    params: dict[str, Any] = {"model": model, "purpose": method}
    if max_seq_length:
        params["context"] = max_seq_length
    state = wizard.build(user, params)
    for row in state.fitting:
        if row.finetune_query:
            where = dict(parse_qsl(row.finetune_query))
            return {name: where[name] for name in PLACED if where.get(name)}
    return None
