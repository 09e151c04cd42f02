"""The one error of Slurm's text."""

from __future__ import annotations


class SlurmParseError(ValueError):
    """Slurm printed something the portal cannot read; callers treat the state as unknown, never as finished."""
