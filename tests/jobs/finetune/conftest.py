"""A fine-tune run's ingredients on the example catalog's local cluster (no cluster needed): tiny-llama as safetensors
there, the owner's account, and a toy chat dataset."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils.datastructures import MultiValueDict

from catalog.models import Cluster, ClusterAccount, ModelCard, ModelVariant, VariantLocation
from jobs.finetune import actions
from jobs.models import FineTuneRun

# A run as actions.create() takes it: where, and a few hyperparameters; the data goes as files.
WHERE = {"model": "tiny-llama", "cluster": "local", "partition": "gpu", "gpu": "a100-80g", "gpus": 1, "walltime": 30}


def chat_lines(count: int = 6) -> bytes:
    return b"".join(
        json.dumps(
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        ).encode()
        + b"\n"
        for i in range(count)
    )


def upload(content: bytes, name: str = "train.jsonl") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, content, content_type="application/jsonl")


@pytest.fixture
def safetensors(account: ClusterAccount) -> ModelVariant:
    """tiny-llama as a safetensors directory on the local cluster (what a fine-tune run trains from)."""
    card = ModelCard.objects.get(name="tiny-llama")
    variant = ModelVariant.objects.create(model=card, quantization="bf16", format="safetensors", size_gib=0.001)
    VariantLocation.objects.create(variant=variant, cluster=Cluster.objects.get(slug="local"), path="/models/tiny")
    return variant


@pytest.fixture
def start(owner: Any, safetensors: ModelVariant, django_capture_on_commit_callbacks: Any) -> Callable[..., FineTuneRun]:
    """Create a run as the page would (its submit task captured, not run)."""

    def create(data: bytes | None = None, user: Any = None, **changes: Any) -> FineTuneRun:
        files = MultiValueDict({"training_file": [upload(chat_lines() if data is None else data)]})
        with django_capture_on_commit_callbacks(execute=False):
            return actions.create(user or owner, {**WHERE, **changes}, files)

    return create
