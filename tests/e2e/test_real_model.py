"""A real model in every runtime, end to end: SmolLM2-135M-Instruct on the local cluster, as the GGUF in llama-server
and as a safetensors directory in vLLM (its CPU build) and in `transformers serve` (scripts/build-torch-runtimes,
scripts/fetch-models). Each session is asked through the portal's API with the official openai client, streaming and
not, and its answers are checked for what they say; each refuses requests without the session's key on every route,
and cancels cleanly. An embeddings session answers `embeddings.create`."""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from catalog.models import VariantLocation
from jobs.cluster import backend, layout
from jobs.models import ApiToken, LLMSession, State
from jobs.sessions.actions import request_cancel
from jobs.tasks import cancel_session
from portal import ssh
from tests.conftest import SMOLLM2_LAUNCH
from tests.e2e.sessions import cancel_all_jobs, drive, local_account, shell

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
QUESTION: list[Any] = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
# Routes a model server has besides the OpenAI ones (vLLM answers these without its own key).
OTHER_ROUTES = ("/invocations", "/pooling", "/score", "/tokenize", "/metrics", "/v1/models", "/v1/chat/completions")
# Per runtime: the variant it serves, and the words its job log uses for the private socket (none for llama.cpp,
# which checks the key itself and listens on the node's address).
RUNTIMES = {"llama.cpp": ("Q4_1", ""), "vllm": ("bf16", "vllm.sock"), "transformers": ("bf16", "transformers.sock")}


def launch_smollm2(owner: Any, capture: Any, local_catalog: dict[str, Any], **changes: Any) -> LLMSession:
    from jobs.sessions.actions import launch
    from jobs.tasks import submit_session

    local_account(owner, local_catalog)
    with capture(execute=False):
        session = launch(owner, {**SMOLLM2_LAUNCH, **changes})
    submit_session.apply(args=(str(session.pk),))
    # vLLM loads in about half a minute on this CPU, more while the other core is busy.
    session = drive(LLMSession.objects.get(pk=session.pk), lambda s: s.state == State.RUNNING or s.is_ended, 300)
    assert session.state == State.RUNNING, session.end_reason
    return session


@pytest.fixture(params=list(RUNTIMES))
def smol_session(
    request: pytest.FixtureRequest, local_catalog: dict[str, Any], smollm2_hf: str, owner: Any,
    django_capture_on_commit_callbacks: Any,
) -> Iterator[LLMSession]:  # fmt: skip
    quant = RUNTIMES[request.param][0]
    yield launch_smollm2(
        owner, django_capture_on_commit_callbacks, local_catalog, runtime=request.param, quant=quant, alias="smol"
    )
    cancel_all_jobs()
    ssh.pool.close_all()
    backend.close_forwards()


def private_socket_dir(session: LLMSession, local_catalog: dict[str, Any]) -> str:
    """The 0700 directory of the session's server socket, from the job's log ("starting ... on SOCKET")."""
    log = shell(local_catalog, f"cat ~/{layout.session_dir(str(session.pk))}/job.log").stdout
    line = next(line for line in log.splitlines() if " on /" in line and "sock" in line)
    return str(Path(line.split(" on ", 1)[1].split()[0]).parent)


def test_smollm2_answers_the_openai_client_in_every_runtime_and_nothing_without_the_key(
    portal_server: str, smol_session: LLMSession, owner: Any, smollm2: str, local_catalog: dict[str, Any]
) -> None:
    import openai

    runtime = smol_session.runtime.kind
    url = backend.base_url(smol_session)
    for route in OTHER_ROUTES:
        assert httpx.post(f"{url}{route}", json={}, timeout=10).status_code == 401, (runtime, route)
    wrong = {"Authorization": "Bearer sk-hpcllm-not-the-key"}
    assert httpx.post(f"{url}/v1/chat/completions", json={}, headers=wrong, timeout=10).status_code == 401
    socket_dir = ""
    if RUNTIMES[runtime][1]:  # the server itself listens where only its user can open it
        socket_dir = private_socket_dir(smol_session, local_catalog)
        listing = shell(local_catalog, f"stat -c '%a %U' {socket_dir}").stdout.split()
        assert listing == ["700", local_catalog["user"]]

    _, token = ApiToken.issue(owner, "script")
    client = openai.OpenAI(base_url=f"{portal_server}/api/v1", api_key=token, max_retries=0, timeout=120)
    assert f"{smollm2}:{smol_session.variant.quantization}" in [m.id for m in client.models.list()]
    # The model as the catalog names it: the caller's newest running session of it.
    whole = client.chat.completions.create(model=smollm2, messages=QUESTION, max_tokens=40, temperature=0)
    assert "Paris" in (whole.choices[0].message.content or ""), runtime
    stream = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=40, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "Paris" in streamed, runtime
    # A raw stream ends as OpenAI's does, whatever the runtime sends (transformers serve sends no [DONE] itself).
    raw = httpx.post(
        f"{portal_server}/api/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, timeout=120,
        json={"model": "smol", "messages": QUESTION, "max_tokens": 8, "stream": True},
    )  # fmt: skip
    assert raw.status_code == 200 and raw.text.rstrip().endswith("data: [DONE]"), raw.text[-200:]

    request_cancel(smol_session, "test")
    cancel_session.apply(args=(str(smol_session.pk),))
    smol_session = drive(smol_session, lambda s: s.is_ended)
    assert smol_session.state == State.CANCELLED
    with pytest.raises(httpx.TransportError):  # nothing listens at its address any more
        httpx.post(f"{url}/v1/models", timeout=5)
    if socket_dir:
        assert shell(local_catalog, f"test -e {socket_dir}; echo $?").stdout.strip() == "1"


@pytest.mark.parametrize("runtime", ["llama.cpp", "vllm"])
def test_an_embeddings_session_answers_embeddings_create(
    runtime: str, portal_server: str, local_catalog: dict[str, Any], smollm2_hf: str, owner: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    import openai

    smollm2 = smollm2_hf
    quant = RUNTIMES[runtime][0]
    launch_smollm2(
        owner, django_capture_on_commit_callbacks, local_catalog, purpose="embeddings", runtime=runtime, quant=quant
    )
    try:
        _, token = ApiToken.issue(owner, "script")
        client = openai.OpenAI(base_url=f"{portal_server}/api/v1", api_key=token, max_retries=0, timeout=120)
        texts = ["Paris is the capital of France.", "The capital of France is Paris.", "Photosynthesis in plants."]
        vectors = [d.embedding for d in client.embeddings.create(model=smollm2, input=texts).data]
        assert [len(v) for v in vectors] == [576] * 3  # SmolLM2-135M's hidden size

        def cosine(a: list[float], b: list[float]) -> float:
            dot = sum(x * y for x, y in zip(a, b, strict=True))
            return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

        assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    finally:
        cancel_all_jobs()
        ssh.pool.close_all()
        backend.close_forwards()


@pytest.mark.django_db(transaction=True)
def test_a_bad_model_directory_fails_with_vllms_own_reason(
    local_catalog: dict[str, Any], smollm2_hf: str, owner: Any, django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    from jobs.sessions.actions import launch
    from jobs.tasks import submit_session

    broken = Path(tempfile.mkdtemp(prefix="broken-checkpoint-", dir="/tmp"))
    broken.chmod(0o755)  # the cluster's user reads it (pytest's own temporary directories are private)
    (broken / "config.json").write_text('{"architectures": ["NoSuchModelForCausalLM"], "model_type": "nosuch"}')
    VariantLocation.objects.filter(variant__quantization="bf16", cluster__slug="local").update(path=str(broken))
    local_account(owner, local_catalog)
    try:
        with django_capture_on_commit_callbacks(execute=False):
            session = launch(owner, {**SMOLLM2_LAUNCH, "runtime": "vllm", "quant": "bf16"})
        submit_session.apply(args=(str(session.pk),))
        session = drive(LLMSession.objects.get(pk=session.pk), lambda s: s.is_ended, 300)
        assert session.state == State.FAILED
        assert "before it was ready" in session.end_reason and "nosuch" in session.end_reason, session.end_reason
    finally:
        cancel_all_jobs()
        ssh.pool.close_all()
        shutil.rmtree(broken, ignore_errors=True)


def test_the_card_comes_from_the_models_own_header(smollm2_hf: str) -> None:
    from catalog.models import ModelCard

    card = ModelCard.objects.get(name=smollm2_hf)
    assert (smollm2_hf, card.license, card.layers, card.attention_heads, card.kv_heads) == (
        "SmolLM2-135M-Instruct", "apache-2.0", 30, 9, 3,
    )  # fmt: skip
    assert sorted(card.variants.values_list("quantization", "format")) == [("Q4_1", "gguf"), ("bf16", "safetensors")]
