"""Slurm's job states (squeue's %T, scontrol's JobState, sacct's State) by what they mean for a job the portal runs:
still waiting for its nodes, holding them, or over for good."""

from __future__ import annotations

PENDING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"})
ACTIVE_STATES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "STAGE_OUT", "RESIZING", "SIGNALING"})
FINISHED_STATES = frozenset(
    {
        "COMPLETED",
        "CANCELLED",
        "FAILED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)


def base_state(text: str) -> str:
    """The state without what Slurm may print after it: sacct's "CANCELLED by 1001", a state's flags."""
    words = text.split()
    return words[0] if words else ""
