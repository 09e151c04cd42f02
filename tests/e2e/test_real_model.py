"""A real model end to end: SmolLM2-135M-Instruct (scripts/fetch-models) in llama-server on the local cluster, asked
through the portal's API with the official openai client. Its answers are checked for what they say."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.cluster import backend
from jobs.models import ApiToken, LLMSession, State
from portal import ssh
from tests.conftest import SMOLLM2_LAUNCH
from tests.e2e.sessions import cancel_all_jobs, drive, local_account
from tests.e2e.test_worker import worker_env
from tests.worker import PortalServer

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
QUESTION: list[Any] = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture
def smol_session(
    local_catalog: dict[str, Any], smollm2: str, owner: Any, django_capture_on_commit_callbacks: Any
) -> Iterator[LLMSession]:
    from jobs.sessions.actions import launch
    from jobs.tasks import submit_session

    local_account(owner, local_catalog)
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**SMOLLM2_LAUNCH, "alias": "smol"})
    submit_session.apply(args=(str(session.pk),))
    session = drive(LLMSession.objects.get(pk=session.pk), lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    yield session
    cancel_all_jobs()
    ssh.pool.close_all()
    backend.close_forwards()


@pytest.fixture
def portal_server(smol_session: LLMSession, tmp_path: Path) -> Iterator[str]:
    server = PortalServer(worker_env(), tmp_path / "uvicorn.log")
    yield server.start()
    server.stop()


def test_smollm2_knows_the_capital_of_france_through_the_api(
    portal_server: str, smol_session: LLMSession, owner: Any, smollm2: str
) -> None:
    import openai

    _, token = ApiToken.issue(owner, "script")
    client = openai.OpenAI(base_url=f"{portal_server}/api/v1", api_key=token, max_retries=0)
    # The model as the catalog names it: the caller's newest running session of it.
    whole = client.chat.completions.create(model=smollm2, messages=QUESTION, max_tokens=40, temperature=0)
    assert "Paris" in (whole.choices[0].message.content or "")
    assert whole.model == "SmolLM2-135M-Instruct-Q4_1"  # what the server itself calls it
    stream = client.chat.completions.create(
        model=str(smol_session.pk), messages=QUESTION, max_tokens=40, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "Paris" in streamed


def test_the_card_comes_from_the_models_own_header(smollm2: str) -> None:
    from catalog.models import ModelCard

    card = ModelCard.objects.get(name=smollm2)
    assert (smollm2, card.license, card.layers, card.attention_heads, card.kv_heads) == (
        "SmolLM2-135M-Instruct", "apache-2.0", 30, 9, 3,
    )  # fmt: skip
    assert list(card.variants.values_list("quantization", "format")) == [("Q4_1", "gguf")]
