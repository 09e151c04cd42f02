"""A fine-tune run's adapter served by name, end to end on the local cluster: a LoRA run of SmolLM2-135M-Instruct
learns an answer the base never gives (tests/e2e/test_finetune.py's toy data, trained harder so that it sticks), its
job converts the adapter to GGUF with llama.cpp's own converter, and a llama.cpp session of the Q4_1 base loads it
(and a vLLM session of the bf16 safetensors loads the PEFT directory): through the portal's API and the official
openai client, the run's model name (ft:...) answers held-out prompts the tuned way, while the session's own name on
the same server still reaches the base weights, before and after; and the compare page's comparison, the same prompts
as two batch runs on that session, shows the base's answers beside the adapter's. The vLLM session is the one a
comparison launches for itself: it waits for it, starts its batch runs once it runs, and ends it after them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone
from django.utils.datastructures import MultiValueDict

from jobs.cluster import backend, layout
from jobs.finetune import comparisons
from jobs.models import ApiToken, BatchRun, FineTuneComparison, FineTuneRun, State
from jobs.sessions.actions import launch
from jobs.tasks import cancel_session, stage_batch, submit_session
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

    questions = SimpleUploadedFile("held-out.txt", "\n".join(HELD_OUT).encode())
    asked = {"source": "prompts", "max_tokens": 24, "temperature": 0}
    comparison: FineTuneComparison | None = None
    if runtime == "vllm":
        # The compare page's own session: the comparison launches the run's safetensors base with the adapter where
        # the wizard's first plan puts it, waits for it, and makes its two batch runs once it runs (the poll's path);
        # the client's checks below run on it before those are staged, and it ends the session after them.
        with django_capture_on_commit_callbacks(execute=False):
            comparison = comparisons.start(
                owner, run, {**asked, "session": comparisons.LAUNCH}, MultiValueDict({"prompts": [questions]})
            )
        assert comparison.state == FineTuneComparison.State.WAITING and comparison.launched_session is not None
        session = comparison.launched_session
        assert (session.runtime.kind, session.variant_id) == ("vllm", run.variant_id)
        submit_session.apply(args=(str(session.pk),))
        waiting = FineTuneComparison.objects.filter(pk=comparison.pk, state=FineTuneComparison.State.WAITING)
        session = sessions.drive(session, lambda s: not waiting.exists() or s.is_ended, 400)
        comparison = FineTuneComparison.objects.get(pk=comparison.pk)
        assert comparison.state == FineTuneComparison.State.STARTED, (comparison.reason, session.end_reason)
    else:
        with django_capture_on_commit_callbacks(execute=False):  # on the run's own account: its home has the adapter
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
    if runtime == "llama.cpp":  # the same trained run, shared: no second training
        a_grantee_under_another_cluster_user_loads_a_copy(
            run, owner, local_catalog, portal_server, django_capture_on_commit_callbacks
        )

    # The compare page's comparison: the same prompts as two batch runs on this session, side by side.
    if comparison is None:
        with django_capture_on_commit_callbacks(execute=False):
            form = {**asked, "session": str(session.pk)}
            comparison = comparisons.start(owner, run, form, MultiValueDict({"prompts": [questions]}))
    for batch in comparison.batches:
        assert stage_batch.apply(args=(str(batch.pk),)).get() in ("staged", "not claimed")  # the worker's part
    compared = FineTuneComparison.objects.filter(pk=comparison.pk)
    launched = comparison.launched_session_id is not None
    sessions.drive(session, lambda s: compared.get().is_ended and (compared.get().session_released_at is not None
                                                                   or not launched), 300)  # fmt: skip
    comparison = compared.get()
    assert [(b.state, b.done) for b in comparison.batches] == [(BatchRun.State.FINISHED, 2)] * 2
    page = comparisons.rows(comparison, 1)
    assert not page.problems and [row.prompt for row in page.rows] == HELD_OUT
    for row in page.rows:
        assert row.base is not None and row.adapter is not None
        assert TUNED in row.adapter.text and TUNED not in row.base.text, row
    if comparison.launched_session_id:  # the session it launched ends with it (the cancel task: the worker's part)
        session.refresh_from_db()
        assert session.cancel_requested_at is not None
        cancel_session.apply(args=(str(session.pk),))
        session = sessions.drive(session, lambda s: s.is_ended, 60)
        assert session.state == State.CANCELLED and "ended by its comparison" in session.end_reason


def a_grantee_under_another_cluster_user_loads_a_copy(
    run: FineTuneRun, owner: Any, local_catalog: dict[str, Any], portal_server: str, capture: Any
) -> None:
    """The run shared with grace, whose account is the local cluster's second user: her llama.cpp session's submit
    copies the adapter (and its GGUF) into her home, her job loads it from there and its name answers the tuned way;
    once the grant is revoked, a new launch with it is refused."""
    import openai
    from django.contrib.auth import get_user_model

    from catalog.models import ClusterAccount
    from jobs.models import FineTuneShare
    from jobs.sessions.forms import LaunchForm

    grace = get_user_model().objects.create_user("grace")
    second = local_catalog["second_user"]
    account = ClusterAccount(cluster=run.cluster, user=grace, kind="personal", username=second)
    account.set_private_key(Path(local_catalog["private_key"]).read_text())
    account.save()
    grant = FineTuneShare.objects.create(run=run, user=grace, created_by=owner)
    launch_data = {**SMOLLM2_LAUNCH, "runtime": "llama.cpp", "quant": "Q4_1", "adapter": run.model_name,
                   "account": account.pk}  # fmt: skip
    with capture(execute=False):  # the submit runs here, not through a worker
        session = launch(grace, launch_data)
    submit_session.apply(args=(str(session.pk),))
    session = sessions.drive(session, lambda s: s.state == State.RUNNING or s.is_ended, 400)
    assert session.state == State.RUNNING, session.end_reason
    copy = f"~/{layout.ADAPTERS_DIR}/{run.pk}/{layout.NAMES.adapter_gguf}"
    assert account.run(f"test -s {copy} && echo copied").stdout.strip() == "copied"
    _, token = ApiToken.issue(grace, "script")
    client = openai.OpenAI(base_url=f"{portal_server}/api/v1", api_key=token, max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=run.model_name, messages=[{"role": "user", "content": HELD_OUT[0]}], max_tokens=24, temperature=0
    )
    assert TUNED in (reply.choices[0].message.content or "")
    FineTuneShare.objects.filter(pk=grant.pk).update(revoked_at=timezone.now())
    refused = LaunchForm(launch_data, user=grace)
    assert not refused.is_valid() and "You have no fine-tune run named" in str(refused.errors), refused.errors
