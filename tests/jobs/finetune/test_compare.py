"""Comparing a fine-tune run's adapter with its base (docs/finetune.md, comparing): the validation data as prompts and
references, the adapter's requests, the two runs' answers paired side by side from hostile result lines, the base's
validation loss from the trainer's step 0, and the pages and command, which are the run's owner's alone."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils.datastructures import MultiValueDict
from hypothesis import given
from hypothesis import strategies as st

from jobs import tasks
from jobs.batch import inputs, staging
from jobs.finetune import advancing, compare, comparisons, progress
from jobs.management.commands import finetune as finetune_command
from jobs.models import BatchRun, FineTuneComparison, FineTuneRun, LLMSession, State, transition
from jobs.sessions.actions import launch
from tests.conftest import LAUNCH
from tests.jobs.batch.results import record
from tests.jobs.finetune.conftest import upload

CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Door 1?"},
                  {"role": "assistant", "content": "MARMALADE"}]},
    {"messages": [{"role": "assistant", "content": "nothing was asked"}]},
    {"messages": [{"role": "user", "content": "Door 2?"}, {"role": "assistant", "content": "Which door?"},
                  {"role": "user", "content": "The second."}, {"role": "assistant", "content": "MARMALADE too"}]},
]  # fmt: skip


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def test_validation_chats_become_their_messages_without_the_last_answer_which_is_the_reference() -> None:
    found = list(compare.examples(io.BytesIO(jsonl(CHATS)), "chat", 10))
    assert [e.reference for e in found] == ["MARMALADE", "MARMALADE too"]  # the assistant-only chat asks nothing
    assert found[0].request == {"messages": CHATS[0]["messages"][:2]}
    assert found[1].request["messages"][-1] == {"role": "user", "content": "The second."}
    assert [e.reference for e in compare.examples(io.BytesIO(jsonl(CHATS)), "chat", 1)] == ["MARMALADE"]


def test_prompt_completion_examples_ask_their_prompt_and_the_prompts_file_passes_the_batch_check() -> None:
    lines = [{"prompt": "Door 3 is", "completion": " MARMALADE"}, {"prompt": "Door 4 is", "completion": " open"}]
    out = io.BytesIO()
    assert compare.validation_prompts(io.BytesIO(jsonl(lines)), out, "prompt-completion", 10) == 2
    requests = io.BytesIO()
    summary = inputs.normalize(io.BytesIO(out.getvalue()), requests, inputs.Options(format="jsonl"))
    assert (summary.prompts, summary.url) == (2, "/v1/completions")
    bodies = [json.loads(line)["body"] for line in requests.getvalue().splitlines()]
    assert bodies == [{"prompt": "Door 3 is"}, {"prompt": "Door 4 is"}]


@pytest.mark.parametrize(
    "runtime, expected",
    [
        ("vllm", {"model": "b-run"}),  # vLLM's LoRA module is the run's uuid
        ("llama.cpp", {"model": "tiny", "lora": [{"id": 1, "scale": 1.0}]}),  # llama-server's id in the session
    ],
)
def test_the_adapters_requests_name_it_as_the_sessions_server_knows_it(runtime: str, expected: dict[str, Any]) -> None:
    assert compare.adapter_fields(runtime, ["a-run", "b-run"], "b-run", "tiny") == expected
    base = jsonl([{"line": 1, "id": "x", "url": "/v1/chat/completions", "body": {"messages": [], "max_tokens": 5}}])
    out = io.BytesIO()
    compare.adapter_requests(io.BytesIO(base), out, expected)
    assert json.loads(out.getvalue())["body"] == {"messages": [], "max_tokens": 5, **expected}


def test_answers_are_paired_by_line_and_hostile_records_count_for_nothing() -> None:
    long_answer = {"message": {"content": "<b>" + "y" * 9000}}
    forged = [
        b"not json at all",
        json.dumps({"line": True, "response": {"choices": [{"message": {"content": "bool line"}}]}}).encode(),
        json.dumps({"line": 99, "response": {"choices": [{"message": {"content": "not asked"}}]}}).encode(),
        json.dumps({"line": 2, "error": "x" * 10_000, "response": None}).encode(),
        json.dumps({"line": 1, "response": {"choices": [long_answer], "usage": {"completion_tokens": -3}}}).encode(),
        json.dumps({"line": 1, "response": {"choices": [{"message": {"content": "a second answer"}}]}}).encode(),
    ]
    found = compare.answers(forged, {1, 2}, max_records=100)
    assert set(found) == {1, 2}
    assert found[1].text.startswith("<b>yyy") and len(found[1].text) == compare.MAX_ANSWER_CHARS and found[1].cut
    assert found[1].completion_tokens is None  # not a count
    assert found[2].error == "x" * compare.MAX_FIELD_CHARS and found[2].text == ""
    # Reading stops at the bound: an endless or huge file is never read past it.
    assert compare.answers(iter(forged), {1}, max_records=3) == {}


@given(st.lists(st.binary(max_size=200), max_size=20))
def test_no_result_line_whatever_it_holds_breaks_the_pairing(lines: list[bytes]) -> None:
    for answer in compare.answers(lines, {1, 2, 3}, max_records=50).values():
        assert isinstance(answer.text, str) and len(answer.text) <= compare.MAX_ANSWER_CHARS


def test_a_page_pairs_prompts_references_and_both_answers() -> None:
    requests = jsonl([
        {"line": n, "id": f"example-{n}", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": f"q{n}"}]}}
        for n in (1, 2, 3)
    ])  # fmt: skip
    page = compare.requests_page(io.BytesIO(requests).readlines(), 1, 5)
    assert page == [(1, 2, "q2"), (2, 3, "q3")]
    base = compare.answers([record(2), record(3)], {2, 3}, 10)
    adapter = compare.answers([record(3)], {2, 3}, 10)
    rows = compare.pair(page, base, adapter, ["r2", "r3"])
    assert [(r.line, r.prompt, r.reference) for r in rows] == [(2, "q2", "r2"), (3, "q3", "r3")]
    assert rows[0].base is not None and rows[0].base.text == "answer 2" and rows[0].adapter is None
    assert rows[1].answers[1] is not None and rows[1].answers[1].completion_tokens == 2


def test_the_base_loss_of_step_0_is_kept_only_as_a_number_and_a_report_without_it_keeps_the_earlier() -> None:
    report = progress.clean({"state": "running", "step": 2, "base_valid_loss": 2.5, "valid_loss": 1.5}, 10)
    assert report is not None and progress.run_fields(report)["base_valid_loss"] == 2.5
    for forged in ("2.5", True, float("nan"), -1, 1e12):
        report = progress.clean({"state": "running", "step": 2, "base_valid_loss": forged}, 10)
        assert report is not None and "base_valid_loss" not in progress.run_fields(report)


# --- the pages and the command ---------------------------------------------------------------------------------------


@pytest.fixture
def adapter(start: Callable[..., FineTuneRun]) -> FineTuneRun:
    """A completed LoRA run of tiny-llama with a validation split, the owner's."""
    data = jsonl([{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
                  for i in range(6)])  # fmt: skip
    run = start(data, suffix="doors", lora_rank=4, validation_split=0.34)
    FineTuneRun.objects.filter(pk=run.pk).update(
        state=FineTuneRun.State.COMPLETED, step=run.planned_steps, valid_loss=0.5, base_valid_loss=2.25
    )
    return FineTuneRun.objects.select_related("variant__model", "owner").get(pk=run.pk)


@pytest.fixture
def session(adapter: FineTuneRun, owner: Any, django_capture_on_commit_callbacks: Any) -> LLMSession:
    """A running llama.cpp session of the base that loaded the adapter."""
    with django_capture_on_commit_callbacks(execute=False):
        made = launch(owner, {**LAUNCH, "adapter": adapter.model_name})
    transition(made.pk, State.RUNNING, cause="test", host="127.0.0.1", port=8080)
    return LLMSession.objects.get(pk=made.pk)


def test_the_compare_page_is_the_owners_and_support_staff_see_it_without_starting_one(
    adapter: FineTuneRun, owner: Any, other_user: Any, support_user: Any, client: Client
) -> None:
    url = f"/finetune/{adapter.pk}/compare/"
    client.force_login(other_user)
    assert client.get(url).status_code == 404
    assert client.post(url, {"source": "validation"}).status_code == 404
    client.force_login(support_user)
    assert client.get(url).status_code == 200
    assert client.post(url, {"source": "validation"}).status_code == 404
    client.force_login(owner)
    assert f'href="{url}"' in client.get(f"/finetune/{adapter.pk}/").content.decode()  # linked from the run's page
    page = client.get(url).content.decode()
    assert "2.2500" in page and "0.5000" in page  # the base's validation loss and the adapter's
    assert "None of your running sessions loaded this adapter" in page and "adapter=ft%3Atiny-llama" in page
    refused = client.post(url, {"source": "validation", "session": "x"}).content.decode()
    assert "Choose one of your running sessions" in refused or "Select a valid choice" in refused
    assert not FineTuneComparison.objects.exists()


def test_a_comparison_runs_the_validation_prompts_as_two_batch_runs_on_the_session(
    adapter: FineTuneRun, session: LLMSession, owner: Any, client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    client.force_login(owner)
    form = {"source": "validation", "session": str(session.pk), "max_tokens": 16, "temperature": 0}
    with django_capture_on_commit_callbacks(execute=False) as staged:
        response = client.post(f"/finetune/{adapter.pk}/compare/", form)
    comparison = FineTuneComparison.objects.get()
    assert response.status_code == 302 and str(comparison.pk) in response["Location"]
    assert len(staged) == 2  # each batch run is staged once the comparison is committed
    assert (comparison.source, comparison.prompts) == ("validation", adapter.valid_examples)
    base, tuned = comparison.batches
    assert base.session_id == tuned.session_id == session.pk and not base.ends_session
    assert base.defaults == {"max_tokens": 16, "temperature": 0}
    base_bodies = [json.loads(line)["body"] for line in base.requests.open("rb")]
    tuned_bodies = [json.loads(line)["body"] for line in tuned.requests.open("rb")]
    assert all("model" not in body and "lora" not in body for body in base_bodies)  # the session's own name
    named = compare.adapter_fields("llama.cpp", [str(adapter.pk)], str(adapter.pk), session.served_model_name)
    assert tuned_bodies == [{**body, **named} for body in base_bodies]


def test_a_prompts_file_is_checked_as_a_batch_runs_and_refused_with_its_line(
    adapter: FineTuneRun, session: LLMSession, owner: Any, client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    client.force_login(owner)
    form = {"source": "prompts", "session": str(session.pk), "prompts": upload(b'{"prompt": 3}\n', "bad.jsonl")}
    page = client.post(f"/finetune/{adapter.pk}/compare/", form).content.decode()
    assert "line 1: prompt must be a non-empty string" in page and not BatchRun.objects.exists()
    form["prompts"] = SimpleUploadedFile("questions.txt", b"Door 31?\nDoor 250?\n")
    with django_capture_on_commit_callbacks(execute=False):
        client.post(f"/finetune/{adapter.pk}/compare/", form)
    assert FineTuneComparison.objects.get().prompts == 2


def test_a_comparisons_page_shows_the_answers_side_by_side_escaped_with_the_references(
    adapter: FineTuneRun, session: LLMSession, owner: Any, other_user: Any, client: Client,
    monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    with django_capture_on_commit_callbacks(execute=False):
        asked = {"source": "validation", "session": str(session.pk)}
        comparison = comparisons.start(owner, adapter, asked, MultiValueDict())

    def results(run: BatchRun, max_record_bytes: int | None = None) -> tuple[bool, Iterator[bytes]]:
        if run.pk == comparison.base_batch_id:
            raise staging.NoResults("nothing yet")
        forged = {"line": 1, "response": {"choices": [{"message": {"content": "<script>alert(1)</script>"}}]}}
        return True, iter([json.dumps(forged).encode(), record(2)])

    monkeypatch.setattr(staging, "results", results)
    BatchRun.objects.filter(pk=comparison.batches[1].pk).update(done=2)  # the base's poll has counted none yet
    url = f"/finetune/{adapter.pk}/compare/{comparison.pk}/"
    client.force_login(owner)
    page = client.get(url).content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert "The base&#x27;s batch run has answered nothing yet." in page
    references = [e.reference for e in compare.examples(adapter.valid_file.open("rb"), "chat", 10)]
    assert references and all(f'<td class="text">{r}</td>' in page for r in references)
    polled = client.get(url, headers={"HX-Request": "true"}).content.decode()
    assert "<h1>" not in polled and 'id="progress"' in polled
    assert comparison.name in client.get(f"/finetune/{adapter.pk}/compare/").content.decode()
    client.force_login(other_user)
    assert client.get(url).status_code == 404


def test_the_command_compares_on_the_newest_session_and_shows_the_comparison(
    adapter: FineTuneRun, session: LLMSession, monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    out = StringIO()
    with django_capture_on_commit_callbacks(execute=False):
        call_command("finetune", "compare", str(adapter.pk), "--validation", "--max-tokens", "8", "--json", stdout=out)
    report = json.loads(out.getvalue())
    assert report["session"] == str(session.pk) and report["valid_loss"] == {"base": 2.25, "adapter": 0.5}
    monkeypatch.setattr(staging, "results", lambda run, max_record_bytes=None: (True, iter([record(1)])))
    BatchRun.objects.update(done=1)
    out = StringIO()
    call_command("finetune", "comparison", report["uuid"], "--json", stdout=out)
    shown = json.loads(out.getvalue())
    assert shown["rows"][0]["base"]["text"] == "answer 1" and shown["rows"][0]["reference"]
    with pytest.raises(Exception, match="Cannot compare: the run is failed"):
        FineTuneRun.objects.filter(pk=adapter.pk).update(state=FineTuneRun.State.FAILED)
        call_command("finetune", "compare", str(adapter.pk), "--validation")


def test_a_start_that_goes_on_from_a_checkpoint_keeps_the_base_loss_its_first_start_measured(tmp_path: Any) -> None:
    from tests.jobs.finetune.test_trainer import trainer

    path = tmp_path / "train-progress.json"
    assert trainer.earlier_base_loss(str(path)) is None  # the first start: none yet
    path.write_text(json.dumps({"state": "running", "step": 3, "base_valid_loss": 2.123456789}))
    assert trainer.earlier_base_loss(str(path)) == 2.12346
    for forged in ('{"base_valid_loss": true}', '{"base_valid_loss": "2"}', "[1]", "{"):
        path.write_text(forged)
        assert trainer.earlier_base_loss(str(path)) is None


# --- a comparison that launches its own session ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_slurm(settings: Any) -> None:
    settings.PORTAL_WIZARD_ASKS_SLURM = False  # the launch is placed by the wizard: unit tests never reach a cluster


def launched(adapter: FineTuneRun, owner: Any, client: Client, capture: Any) -> tuple[FineTuneComparison, list[Any]]:
    client.force_login(owner)
    form = {"source": "validation", "session": comparisons.LAUNCH, "max_tokens": 16, "temperature": 0}
    with capture(execute=False) as enqueued:
        response = client.post(f"/finetune/{adapter.pk}/compare/", form)
    comparison = FineTuneComparison.objects.get()
    assert response.status_code == 302 and str(comparison.pk) in response["Location"], response.content.decode()
    return comparison, enqueued


def test_without_a_session_the_page_offers_to_launch_one_that_loads_the_adapter(
    adapter: FineTuneRun, owner: Any, client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    client.force_login(owner)
    page = client.get(f"/finetune/{adapter.pk}/compare/").content.decode()
    assert f'<option value="{comparisons.LAUNCH}" selected>launch one for this comparison' in page
    comparison, enqueued = launched(adapter, owner, client, django_capture_on_commit_callbacks)
    assert len(enqueued) == 1  # the session's submit, through the sessions' own launch path
    session = comparison.launched_session
    assert session is not None and session.owner == owner and list(session.adapters.all()) == [adapter]
    assert (session.variant, session.runtime.kind, session.walltime_min) == (
        adapter.variant, "vllm", comparisons.LAUNCH_WALLTIME_MIN,
    )  # fmt: skip
    assert session.cluster == adapter.cluster and session.gpus_per_node == 1
    reply = adapter.max_seq_length + 16  # the run's sequence length and a reply, not the model's whole context
    assert session.context_length == min(adapter.variant.model.max_context, max(1024, -(-reply // 256) * 256))
    assert comparison.state == FineTuneComparison.State.WAITING and comparison.batches == () and comparison.requests
    assert not comparison.is_ended and not BatchRun.objects.exists()
    page = client.get(f"/finetune/{adapter.pk}/compare/{comparison.pk}/").content.decode()
    assert "waiting for its session" in page and "launched for this comparison" in page and 'hx-get="' in page
    assert "waiting for its session" in client.get(f"/finetune/{adapter.pk}/compare/").content.decode()
    assert session.pk not in [s.pk for s in comparisons.sessions_for(adapter)]  # not offered to another comparison


def test_the_comparison_starts_its_batch_runs_once_its_session_runs_and_ends_it_after_them(
    adapter: FineTuneRun, owner: Any, client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    from jobs.sessions.lifecycle import Polled

    comparison, _ = launched(adapter, owner, client, django_capture_on_commit_callbacks)
    session = comparison.launched_session
    assert session is not None
    assert tasks.advance_comparison(str(comparison.pk)) == "waiting"
    transition(session.pk, State.RUNNING, cause="test", host="127.0.0.1", port=8080)
    with django_capture_on_commit_callbacks(execute=False) as staged:
        tasks.after_poll(Polled(counts={}, session_ids=[str(session.pk)]))  # the poll's path
    comparison.refresh_from_db()
    assert comparison.state == FineTuneComparison.State.STARTED and len(staged) == 2
    base, tuned = comparison.batches
    assert base.session_id == tuned.session_id == session.pk and base.prompts == adapter.valid_examples
    assert base.defaults == {"max_tokens": 16, "temperature": 0}
    tuned_bodies = [json.loads(line)["body"] for line in tuned.requests.open("rb")]
    assert all(body["model"] == str(adapter.pk) for body in tuned_bodies)  # vLLM's LoRA module
    assert not comparison.requests  # the batch runs have their own copies
    assert tasks.advance_comparison(str(comparison.pk)) == "running"  # started once, however often asked
    assert BatchRun.objects.count() == 2
    BatchRun.objects.filter(pk=base.pk).update(state=BatchRun.State.FINISHED)
    assert tasks.advance_comparison(str(comparison.pk)) == "running"  # the adapter's still runs
    BatchRun.objects.filter(pk=tuned.pk).update(state=BatchRun.State.FINISHED)
    with django_capture_on_commit_callbacks(execute=False) as cancels:
        assert tasks.advance_comparison(str(comparison.pk)) == "released"
        assert tasks.advance_comparison(str(comparison.pk)) == "done"
    assert len(cancels) == 1 and advancing.to_advance() == []  # ended once
    session.refresh_from_db()
    assert session.cancel_requested_at is not None


def test_a_session_that_ends_before_it_runs_ends_the_comparison_with_the_reason(
    adapter: FineTuneRun, owner: Any, client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    from jobs.sessions import lifecycle

    comparison, _ = launched(adapter, owner, client, django_capture_on_commit_callbacks)
    assert comparison.launched_session is not None
    lifecycle.fail(str(comparison.launched_session.pk), "sbatch: error: Invalid account")
    assert tasks.advance_comparison(str(comparison.pk)) == "released"
    comparison.refresh_from_db()
    assert comparison.state == FineTuneComparison.State.FAILED and comparison.is_ended
    assert "its session failed" in comparison.reason and "Invalid account" in comparison.reason
    assert not comparison.requests and not BatchRun.objects.exists()
    page = client.get(f"/finetune/{adapter.pk}/compare/{comparison.pk}/").content.decode()
    assert "Invalid account" in page and 'hx-trigger="every 3s"' not in page


def test_a_refused_launch_creates_nothing_and_says_why(
    adapter: FineTuneRun, owner: Any, client: Client, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.PORTAL_MAX_SESSIONS_PER_USER = 1
    with django_capture_on_commit_callbacks(execute=False):
        launch(owner, LAUNCH)  # the user's one live session, without the adapter
    client.force_login(owner)
    form = {"source": "validation", "session": comparisons.LAUNCH}
    page = client.post(f"/finetune/{adapter.pk}/compare/", form).content.decode()
    assert "Cannot launch a session for the comparison: cluster: You have 1 live session" in page
    assert not FineTuneComparison.objects.exists() and LLMSession.objects.count() == 1


def test_a_comparison_on_the_users_own_session_never_ends_it(
    adapter: FineTuneRun, session: LLMSession, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        asked = {"source": "validation", "session": str(session.pk)}
        comparison = comparisons.start(owner, adapter, asked, MultiValueDict())
    BatchRun.objects.update(state=BatchRun.State.FINISHED)
    assert advancing.to_advance() == [] and tasks.advance_comparison(str(comparison.pk)) == "nothing"
    session.refresh_from_db()
    assert session.state == State.RUNNING and session.cancel_requested_at is None


def test_the_command_launches_a_session_for_the_comparison(
    adapter: FineTuneRun, django_capture_on_commit_callbacks: Any
) -> None:
    out = StringIO()
    with django_capture_on_commit_callbacks(execute=False):
        call_command("finetune", "compare", str(adapter.pk), "--validation", "--launch", "--json", stdout=out)
    report = json.loads(out.getvalue())
    comparison = FineTuneComparison.objects.get(pk=report["uuid"])
    assert report["state"] == "waiting" and report["batches"] == {}
    assert report["launched_session"] == report["session"] == str(comparison.launched_session_id)


def test_the_commands_wait_gives_up_with_the_state_and_returns_once_ended(
    adapter: FineTuneRun, session: LLMSession, django_capture_on_commit_callbacks: Any
) -> None:
    out = StringIO()
    with (
        django_capture_on_commit_callbacks(execute=False),
        pytest.raises(CommandError, match=r"gave up waiting after 0s; the comparison is started"),
    ):
        call_command("finetune", "compare", str(adapter.pk), "--validation", "--wait", "--timeout", "0", stdout=out)
    comparison = FineTuneComparison.objects.get()
    BatchRun.objects.update(state=BatchRun.State.FINISHED)
    assert finetune_command.ended(lambda: FineTuneComparison.objects.get(pk=comparison.pk), 0, "comparison").is_ended
