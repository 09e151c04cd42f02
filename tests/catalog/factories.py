"""Small builders for valid catalog rows; each test changes only what it is about."""

from __future__ import annotations

from typing import Any

from catalog.architecture import Architecture
from catalog.models import Cluster, GPUType, ModelCard, ModelVariant, Partition, Runtime

HOST_KEY = "login.example.edu ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def cluster(**over: Any) -> Cluster:
    values: dict[str, Any] = {"name": "Example", "slug": "example", "login_host": "login.example.edu"}
    return Cluster(**{**values, **over})


def gpu(**over: Any) -> GPUType:
    values: dict[str, Any] = {
        "name": "a100-80g",
        "display_name": "A100 80GB",
        "memory_gib": 80,
        "reserved_gib": 0.5,
    }
    return GPUType(**{**values, **over})


def partition(cluster_obj: Cluster, **over: Any) -> Partition:
    values: dict[str, Any] = {"cluster": cluster_obj, "name": "gpu", "max_walltime_min": 2880}
    return Partition(**{**values, **over})


LLAMA_31_8B = Architecture(8.03, 32, 4096, 32, 8, 128, 128256, 131072)


def model_card(**over: Any) -> ModelCard:
    card = ModelCard(name="Llama-3.1-8B", family="llama")
    card.set_architecture(LLAMA_31_8B)
    for name, value in over.items():
        setattr(card, name, value)
    return card


def variant(card: ModelCard, **over: Any) -> ModelVariant:
    values: dict[str, Any] = {"model": card, "quantization": "Q4_K_M", "format": "gguf", "size_gib": 4.58}
    return ModelVariant(**{**values, **over})


def runtime(kind: str = "llama.cpp") -> Runtime:
    return Runtime.objects.create(kind=kind, display_name=kind)
