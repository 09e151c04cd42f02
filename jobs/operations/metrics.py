"""Prometheus metrics (placeholder until written)."""

from __future__ import annotations


def observe_request(
    route: str, endpoint: str, status: int, ttft_s: float | None, duration_s: float, bytes_out: int
) -> None:
    """One request through the proxy ended."""
