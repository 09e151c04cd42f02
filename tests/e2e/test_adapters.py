"""A fine-tune run's adapter served by name, end to end on the local cluster: a LoRA run of SmolLM2-135M-Instruct
learns an answer the base never gives (tests/e2e/test_finetune.py's toy data, trained harder so that it sticks), its
job converts the adapter to GGUF with llama.cpp's own converter, and a llama.cpp session of the Q4_1 base loads it
(and a vLLM session of the bf16 safetensors loads the PEFT directory): through the portal's API and the official
openai client, the run's model name (ft:...) answers held-out prompts the tuned way, while the session's own name on
the same server still reaches the base weights, before and after; and the compare page's comparison, the same prompts
as two batch runs on that session, shows the base's answers beside the adapter's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils.datastructures import MultiValueDict

from jobs.cluster import backend, layout
from jobs.finetune import comparisons
from jobs.models import ApiToken, BatchRun, FineTuneComparison, FineTuneRun, State
from jobs.sessions.actions import launch
from jobs.tasks import stage_batch, submit_session
from portal import ssh
from tests.conftest import SMOLLM2_LAUNCH
from tests.e2e import sessions
from tests.e2e.sessions import cancel_all_jobs, shell
from tests.e2e.test_finetune import HYPERPARAMETERS, drive, start

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
# Prompts the toy data never had (its doors are 0 to 7), and the answer only the tuned model gives.
HELD_OUT = ["What is the password of door 31?", "What is the password of door 250?"]
TUNED = "MARMALADE"
# Enough steps at a high rate for 135M parameters to learn one answer (about 20 steps, a few minutes on this CPU).
TRAIN_HARDER = {**HYPERPARAMETERS, "epochs": 5, "learning_rate": 0.003, "lora_rank": 8, "lora_alpha": 16,
                "checkpoint_every": 1000}  # fmt: skip


@pytest.fixture(autouse=True)
def _clean_up() -> Iterator[None]:
    yield
    cancel_all_jobs()
    ssh.pool.close_all()
    backend.close_forwards()


@pytest.mark.parametrize("runtime, quant", [("llama.cpp", "Q4_1"), ("vllm", "bf16")])
def test_a_session_answers_by_the_adapters_name_the_tuned_way_and_by_its_own_the_base_way(
    runtime: str, quant: str, portal_server: str, owner: Any, local_catalog: dict[str, Any], smollm2_hf: str,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    import openai

    run = start(owner, local_catalog, django_capture_on_commit_callbacks, suffix="doors", **TRAIN_HARDER)
    run = drive(run, lambda r: r.is_ended, timeout_s=900)
    assert run.state == FineTuneRun.State.COMPLETED, run.end_reason
    gguf = shell(local_catalog, f"test -s ~/{layout.session_file(str(run.pk), layout.NAMES.adapter_gguf)}; echo $?")
    assert gguf.stdout.strip() == "0", "the run's job made no GGUF of its adapter"

    with django_capture_on_commit_callbacks(execute=False):  # on the run's own account: the adapter is in its home
        session = launch(owner, {**SMOLLM2_LAUNCH, "runtime": runtime, "quant": quant, "adapter": run.model_name})
    submit_session.apply(args=(str(session.pk),))
    session = sessions.drive(session, lambda s: s.state == State.RUNNING or s.is_ended, 400)
    assert session.state == State.RUNNING, session.end_reason
    assert list(session.adapters.all()) == [run]
    _, token = ApiToken.issue(owner, "script")
    client = openai.OpenAI(base_url=f"{portal_server}/api/v1", api_key=token, max_retries=0, timeout=120)
    assert run.model_name in [m.id for m in client.models.list()]

    def ask(model: str, prompt: str) -> str:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0
        )
        return reply.choices[0].message.content or ""

    for prompt in HELD_OUT:
        before = ask(str(session.pk), prompt)
        tuned = ask(run.model_name, prompt)
        after = ask(str(session.pk), prompt)  # the adapter of the request before is not left on
        assert TUNED in tuned, (prompt, tuned)
        assert TUNED not in before and TUNED not in after, (prompt, before, after)

    # The compare page's comparison: the same prompts as two batch runs on this session, side by side.
    questions = SimpleUploadedFile("held-out.txt", "\n".join(HELD_OUT).encode())
    form = {"source": "prompts", "session": str(session.pk), "max_tokens": 24, "temperature": 0}
    with django_capture_on_commit_callbacks(execute=False):
        comparison = comparisons.start(owner, run, form, MultiValueDict({"prompts": [questions]}))
    for batch in comparison.batches:
        assert stage_batch.apply(args=(str(batch.pk),)).get() == "staged"
    sessions.drive(session, lambda s: FineTuneComparison.objects.get(pk=comparison.pk).is_ended, 300)
    comparison = FineTuneComparison.objects.get(pk=comparison.pk)
    assert [(b.state, b.done) for b in comparison.batches] == [(BatchRun.State.FINISHED, 2)] * 2
    page = comparisons.rows(comparison, 1)
    assert not page.problems and [row.prompt for row in page.rows] == HELD_OUT
    for row in page.rows:
        assert row.base is not None and row.adapter is not None
        assert TUNED in row.adapter.text and TUNED not in row.base.text, row
