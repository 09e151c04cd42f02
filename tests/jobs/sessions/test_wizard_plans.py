"""The wizard's plans: RAG and fine-tuning sized with the same bar and options, and nothing to launch."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from django.test import Client


def page(client: Client, **choices: str) -> str:
    reply = client.get("/launch/", {"model": "Llama-3.1-8B-Instruct", "context": "2048", **choices})
    assert reply.status_code == 200
    return reply.content.decode()


def one_gpu_gib(text: str) -> float:
    match = re.search(r"GPU memory: ([\d.]+) GiB on one GPU", text)
    assert match is not None
    return float(match[1])


def test_fine_tuning_plans_show_their_parts_and_where_they_fit(
    wizard_client: Client, example_catalog: Path, account: Any
) -> None:
    qlora = page(wizard_client, purpose="qlora", quant="Q4_K_M")
    assert '<option value="qlora" selected>' in qlora
    assert "adapters" in qlora and "optimizer states" in qlora and "gradients" in qlora
    assert "A plan: fine-tuning runs as your own Slurm job (sbatch --partition=" in qlora
    assert "data-launch" not in qlora  # nothing to launch
    full = page(wizard_client, purpose="full", quant="bf16")
    assert one_gpu_gib(full) > 3 * one_gpu_gib(qlora)
    # Where the owner could launch a session of the same model, a plan still offers no launch.
    tiny = {"model": "tiny-llama", "quant": "fp16", "runtime": "llama.cpp", "context": "1024"}
    assert "data-launch" in page(wizard_client, purpose="chat", **tiny)
    planned = page(wizard_client, purpose="lora", **tiny)
    assert "data-launch" not in planned and "A plan: fine-tuning" in planned
    assert "nearest published fine-tuning runs (FT" in qlora


def test_a_rag_plan_adds_the_retrieval_side_to_the_chat_model(wizard_client: Client, example_catalog: Path) -> None:
    chat = page(wizard_client, purpose="chat", quant="Q4_K_M", runtime="llama.cpp")
    rag = page(wizard_client, purpose="rag", quant="Q4_K_M", runtime="llama.cpp")
    assert "embedding model and reranker" in rag and "vector index" in rag
    assert 10 <= one_gpu_gib(rag) - one_gpu_gib(chat) <= 30
    assert "launch the chat model and an embeddings session" in rag
    # Serving and RAG estimates say how sure they are: the nearest published measurements of the same engine.
    assert "How sure:</strong> within" in chat and "nearest published measurements (p4 Llama-3.1-8B, ollama" in chat


def test_a_plan_too_long_for_the_model_says_why(wizard_client: Client, example_catalog: Path) -> None:
    text = page(wizard_client, purpose="rag", quant="Q4_K_M", runtime="llama.cpp", context="131072")
    assert "above the model&#x27;s maximum" in text or "above the model's maximum" in text


def test_a_plan_cannot_be_posted_as_a_launch(wizard_client: Client, account: Any) -> None:
    reply = wizard_client.post("/launch/", {
        "cluster": "local", "partition": "gpu", "gpu": "a100-80g", "gpus": "1", "model": "tiny-llama",
        "quant": "fp16", "runtime": "llama.cpp", "context": "1024", "walltime": "30", "purpose": "lora",
    })  # fmt: skip
    assert reply.status_code in (200, 400)
    assert "Select a valid choice" in reply.content.decode()
