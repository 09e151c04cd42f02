"""Hand-made sessions, requests and batch runs for the usage figures: each test says exactly what happened when."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from catalog.models import Cluster, ClusterAccount, GPUType, ModelVariant, Partition, Runtime
from jobs.models import BatchRun, LLMSession, ProxyRequest, State


def at(text: str) -> datetime:
    """A moment in UTC: "2025-01-31 22:00"."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def make_session(account: ClusterAccount, owner: Any) -> Callable[..., LLMSession]:
    """A session that Slurm ran from `start` to `end` (None: still running) on the local cluster."""

    account_owner = owner

    def make(
        owner: Any = None,
        *,
        start: str | None,
        end: str | None = None,
        gpus: int = 1,
        nodes: int = 1,
        model: str = "tiny-llama",
        gpu: str = "a100-80g",
        cluster: str = "local",
        partition: str = "gpu",
        **fields: Any,
    ) -> LLMSession:
        found = Cluster.objects.get(slug=cluster)
        variant = ModelVariant.objects.filter(model__name=model).first()
        assert variant is not None
        return LLMSession.objects.create(
            owner=owner or account_owner,
            account=fields.pop("account", account),
            cluster=found,
            partition=Partition.objects.get(cluster=found, name=partition),
            gpu_type=GPUType.objects.get(name=gpu),
            variant=variant,
            runtime=Runtime.objects.get(kind="llama.cpp"),
            gpus_per_node=gpus,
            nodes=nodes,
            cpus_per_node=1,
            memory_gib=1,
            context_length=1024,
            state=State.COMPLETED if end else State.RUNNING,
            started_at=at(start) if start else None,
            ended_at=at(end) if end else None,
            **fields,
        )

    return make


def request(session: LLMSession, user: Any, when: str, **fields: Any) -> ProxyRequest:
    """One request through the proxy: 200, 10 prompt and 20 completion tokens unless told."""
    values: dict[str, Any] = {"route": "api", "endpoint": "chat/completions", "status": 200, "prompt_tokens": 10,
                              "completion_tokens": 20, "duration_ms": 100.0}  # fmt: skip
    values.update(fields)
    return ProxyRequest.objects.create(session=session, user=user, at=at(when), **values)


def batch_run(session: LLMSession, owner: Any, when: str, prompt: int, completion: int) -> BatchRun:
    run = BatchRun.objects.create(
        owner=owner, session=session, name="prompts.txt", input_format="text", endpoint="chat/completions",
        prompts=10, requests="batch/x/requests.jsonl", prompt_tokens=prompt, completion_tokens=completion,
        state=BatchRun.State.FINISHED, started_at=at(when),
    )  # fmt: skip
    return run
