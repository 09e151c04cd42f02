"""Comparing a fine-tune run's adapter with its base model (docs/finetune.md, comparing), the one path for the page
and `manage.py finetune compare`: CompareForm (what to ask and where), start() (the two batch runs and their record),
and rows() (a page of the answers side by side, read from the cluster).

A comparison is two batch runs over the same checked requests on one running session of the base model that loaded
the run's adapter: one names the session's own model (the base weights), the other the adapter, so both answer on the
same server, with the same sampling, at the same time. The prompts are a prompts file (the batch runs' formats,
checked by their form) or the run's validation data, whose final answers stand beside them as the references.

Without such a session the form's session menu offers to launch one for the comparison (LAUNCH): launch_fields()
makes the launch (the run's base variant with its adapter, a short walltime, placed by the wizard's first fitting
plan, else on the run's own cluster and partition) and the sessions' own launch path checks and submits it. The
comparison then waits for it, keeping its checked requests; advancing.py moves it along (after each poll of the
session's account, and from beat): it starts the two batch runs once the session runs, ends the comparison with the
reason when the session ends first, and ends the session once both batch runs have ended.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.files import File
from django.core.files.uploadedfile import TemporaryUploadedFile
from django.db import transaction
from django.db.models import QuerySet
from django.utils.datastructures import MultiValueDict

from jobs.batch import actions as batch_actions
from jobs.batch import staging
from jobs.batch.forms import BatchForm, Checked
from jobs.finetune import advancing, compare
from jobs.models import BatchRun, FineTuneComparison, FineTuneRun, LLMSession, Purpose, State
from jobs.sessions import actions as session_actions
from jobs.sessions import wizard
from jobs.sessions.forms import available_runtimes, form_errors
from portal import ssh
from portal.errors import messages_of

MAX_PROMPTS = 2000  # a comparison is read side by side; the validation data's first ones, or a file of at most this
PAGE_SIZE = 20
MAX_RECORD_BYTES = 1 << 20  # a result line the page reads (a longer one stands as an error saying so)
ADAPTER_RUNTIMES = ("llama.cpp", "vllm")
# The batch form's own fields a comparison takes: the prompts and how to ask them (not replicas: it runs on a session).
ASKED = ("prompts", "input_format", "system_prompt", "max_tokens", "temperature")
LAUNCH = "launch"  # the session menu's choice that launches a session for the comparison
LAUNCH_WALLTIME_MIN = 30  # a comparison's own session: long enough for its prompts, short enough to queue soon
# Its context: what the run trained on and a reply, at least this (validation prompts may be longer than the trainer
# cut them); a model's default context would size a KV cache many times what the comparison asks.
LAUNCH_MIN_CONTEXT = 1024
DEFAULT_REPLY_TOKENS = 256  # the form's default max tokens, for a reply the file's requests leave unbounded


def sessions_for(run: FineTuneRun) -> QuerySet[LLMSession]:
    """The owner's running sessions that loaded the run's adapter, newest first: where a comparison can run (not one
    that a comparison launched for itself, which it ends when it is done)."""
    launched = FineTuneComparison.objects.filter(launched_session__isnull=False).values("launched_session")
    return (
        LLMSession.objects.filter(owner_id=run.owner_id, adapters=run, state=State.RUNNING, deleted_at__isnull=True)
        .exclude(host="")
        .exclude(pk__in=launched)
        .select_related("runtime", "variant__model", "cluster")
        .order_by("-created_at")
    )


def why_not(run: FineTuneRun) -> str:
    """Why the run cannot be compared now; "" when it can."""
    if run.state != FineTuneRun.State.COMPLETED:
        return f"the run is {run.get_state_display()}: only a completed run has an adapter to compare"
    if run.method == FineTuneRun.Method.FULL:
        return "a full fine-tuning run is a whole model, not an adapter that a session of the base loads"
    return ""


class CompareForm(forms.Form):
    """What a comparison asks (the prompts file or the validation data, with the batch form's own fields for how to
    ask them) and on which session. Its fields are set below the class."""

    checked: Checked | None = None

    def __init__(self, *args: Any, run: FineTuneRun, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run = run
        self.sessions = list(sessions_for(run))
        session_field = self.fields["session"]
        assert isinstance(session_field, forms.ChoiceField)
        session_field.choices = [
            (str(s.pk), f"{s.alias or str(s.pk)[:8]}: {s.variant} on {s.cluster.name} ({s.runtime.kind})")
            for s in self.sessions
        ] + [(LAUNCH, f"launch one for this comparison ({run.variant} with the adapter, {LAUNCH_WALLTIME_MIN} min)")]
        session_field.initial = str(self.sessions[0].pk) if self.sessions else LAUNCH
        if not run.valid_file:
            source = self.fields["source"]
            assert isinstance(source, forms.ChoiceField)
            source.choices = [(FineTuneComparison.Source.PROMPTS, FineTuneComparison.Source.PROMPTS.label)]
            source.initial = FineTuneComparison.Source.PROMPTS

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        if reason := why_not(self.run):
            raise ValidationError(f"Cannot compare: {reason}.")
        session = next((s for s in self.sessions if str(s.pk) == data.get("session")), None)
        if data.get("session") == LAUNCH:
            pass  # start() launches it, through the launch form, which says why not
        elif session is None:
            raise ValidationError({"session": "Choose one of your running sessions that loaded this adapter."})
        elif session.runtime.kind not in ADAPTER_RUNTIMES:
            raise ValidationError({"session": "The session's runtime does not serve adapters."})
        data["session"] = session
        asked = {k: v for k, v in data.items() if k in ASKED and k != "prompts" and v not in (None, "")}
        prompts: Any
        if data["source"] == FineTuneComparison.Source.VALIDATION:
            prompts, name = self._validation_prompts(), f"{self.run.name}: validation data"
            asked["input_format"] = "jsonl"
        else:
            prompts, name = data.get("prompts"), ""
            if prompts is None:
                raise ValidationError({"prompts": "Upload a prompts file, or compare on the validation data."})
        batch = BatchForm(asked, MultiValueDict({"prompts": [prompts]}))
        try:
            if not batch.is_valid():
                raise form_errors(batch)
        finally:
            if name:
                prompts.close()
        assert batch.checked is not None
        if batch.checked.columns["prompts"] > MAX_PROMPTS:
            batch.checked.requests.close()
            too_many = f"A comparison takes at most {MAX_PROMPTS:,} prompts (a batch run takes more)."
            raise ValidationError({"prompts": too_many})
        if batch.checked.columns["endpoint"] == "/v1/embeddings":
            batch.checked.requests.close()
            raise ValidationError({"prompts": "A comparison compares answers, not embeddings."})
        if name:
            batch.checked.columns["name"] = name[:200]
        self.checked = batch.checked
        return data

    def _validation_prompts(self) -> TemporaryUploadedFile:
        if not self.run.valid_file:
            raise ValidationError({"source": "The run has no validation data; upload a prompts file."})
        upload = TemporaryUploadedFile("validation.jsonl", "application/jsonl", 0, "utf-8")
        with self.run.valid_file.open("rb") as src:
            count = compare.validation_prompts(src, upload, self.run.data_format, MAX_PROMPTS)
        if not count:
            upload.close()
            raise ValidationError({"source": "The validation data has no example with a prompt to ask."})
        upload.size = upload.tell()
        upload.seek(0)
        return upload


CompareForm.base_fields = CompareForm.declared_fields = {
    "source": forms.ChoiceField(
        choices=FineTuneComparison.Source.choices,
        initial=FineTuneComparison.Source.VALIDATION,
        label="prompts",
        help_text=f"the validation data (its first {MAX_PROMPTS:,} examples, the last assistant turn the reference), "
        "or a prompts file",
    ),
    "session": forms.ChoiceField(
        choices=[],
        help_text="a running session of the base model that loaded this adapter: it answers both ways; or launch "
        "one for the comparison, which ends it when both batch runs have",
    ),
    **{name: copy.deepcopy(BatchForm.base_fields[name]) for name in ASKED},
}
CompareForm.base_fields["prompts"].required = False
CompareForm.base_fields["max_tokens"].initial = DEFAULT_REPLY_TOKENS
CompareForm.base_fields["temperature"].initial = 0


def start(user: User, run: FineTuneRun, data: Mapping[str, Any], files: MultiValueDict[str, Any]) -> FineTuneComparison:
    """Check a comparison (CompareForm), then in one transaction: on a running session, the base's batch run and
    the adapter's and the comparison that holds them; or, for LAUNCH, the session's launch (launch_fields) and the
    comparison that waits for it with its checked requests (advance() starts the batch runs)."""
    if run.owner_id != user.pk:
        raise ValidationError("A run is compared by its owner.")
    form = CompareForm(data, files, run=run)
    if not form.is_valid():
        raise form_errors(form)
    checked, session = form.checked, form.cleaned_data["session"]
    assert checked is not None
    source = form.cleaned_data["source"]
    if session is None:
        return _launch_and_wait(user, run, source, checked)
    assert isinstance(session, LLMSession)
    with checked.requests as requests, transaction.atomic():
        base, adapter = advancing.record_batches(session, run, requests, checked.columns)
        batch_actions.stage(base)
        batch_actions.stage(adapter)
        return FineTuneComparison.objects.create(
            owner=user, run=run, source=source, name=checked.columns["name"][:200],
            prompts=base.prompts, base_batch=base, adapter_batch=adapter,
        )  # fmt: skip


def launch_fields(user: User, run: FineTuneRun, reply_tokens: int) -> dict[str, Any]:
    """The launch of a comparison's own session, as the launch form takes it: the run's base variant on the first
    runtime offered for it that loads adapters, the adapter, LAUNCH_WALLTIME_MIN, a context for the run's sequence
    length and a reply of `reply_tokens` (at least LAUNCH_MIN_CONTEXT, at most the model's); where the wizard's
    first fitting plan for a chat session of it puts it (the account included), else on the run's own cluster,
    partition, GPU type and account, one GPU. The launch form checks it as any launch."""
    variant = run.variant
    runtime = next((kind for kind in available_runtimes(variant) if kind in ADAPTER_RUNTIMES), None)
    if runtime is None:
        raise ValidationError(
            f"No cluster offers llama.cpp or vLLM for {variant}, the run's base, so no session of it can load the "
            "adapter for a comparison."
        )
    wanted = max(LAUNCH_MIN_CONTEXT, run.max_seq_length + reply_tokens)
    context = min(variant.model.max_context, math.ceil(wanted / 256) * 256)
    choices = {"model": variant.model.name, "quant": variant.quantization, "runtime": runtime, "context": context,
               "purpose": Purpose.CHAT, "walltime": LAUNCH_WALLTIME_MIN, "adapter": run.model_name}  # fmt: skip
    state = wizard.build(user, choices)
    planned = next((row.launch.values for row in state.fitting if row.launch is not None), None)
    if planned is not None:
        return {**planned, **choices}
    own = {"cluster": run.cluster.slug, "partition": run.partition.name, "gpu": run.gpu_type.name, "gpus": 1}
    return {**choices, **own, "account": run.account_id}


def _launch_and_wait(user: User, run: FineTuneRun, source: str, checked: Checked) -> FineTuneComparison:
    """Launch the comparison's own session (the sessions' launch path: its form, the limits under the user's lock,
    the submit once committed) and record the comparison waiting for it, with its checked requests."""
    try:
        fields = launch_fields(user, run, checked.columns["defaults"].get("max_tokens") or DEFAULT_REPLY_TOKENS)
    except ValidationError as exc:
        checked.requests.close()
        raise ValidationError(f"Cannot launch a session for the comparison: {'; '.join(messages_of(exc))}") from None
    asked = {name: value for name, value in checked.columns.items() if name != "replicas"}
    with checked.requests as requests, transaction.atomic():
        try:
            session = session_actions.launch(user, fields)
        except ValidationError as exc:
            reasons = "; ".join(messages_of(exc))
            raise ValidationError(f"Cannot launch a session for the comparison: {reasons}") from None
        comparison = FineTuneComparison(
            owner=user, run=run, source=source, name=checked.columns["name"][:200], prompts=checked.columns["prompts"],
            state=FineTuneComparison.State.WAITING, launched_session=session, asked=asked,
        )  # fmt: skip
        comparison.requests.save("requests.jsonl", File(requests), save=False)
        comparison.save()
    return comparison


@dataclass(frozen=True)
class Page:
    rows: list[compare.Row]
    number: int
    pages: int
    problems: list[str]  # why an answer column is empty: nothing answered yet, the cluster out of reach


def page_count(comparison: FineTuneComparison) -> int:
    return max(1, math.ceil(comparison.prompts / PAGE_SIZE))


def rows(comparison: FineTuneComparison, number: int) -> Page:
    """A page of the comparison side by side: its prompts from the portal's own requests file, the references from
    the run's validation data, and the two runs' answers from the cluster (read bounded: compare.answers)."""
    number = min(max(1, number), page_count(comparison))
    start_at = (number - 1) * PAGE_SIZE
    if comparison.base_batch is None or comparison.adapter_batch is None:
        return Page([], number, page_count(comparison), [f"The comparison is {comparison.get_state_display()}."])
    with comparison.base_batch.requests.open("rb") as requests:
        page = compare.requests_page(requests, start_at, PAGE_SIZE)
    references = None
    if comparison.has_references and comparison.run.valid_file:
        with comparison.run.valid_file.open("rb") as src:
            found = compare.examples(src, comparison.run.data_format, start_at + PAGE_SIZE)
            references = [example.reference for example in found][start_at:]
    wanted = {line for _index, line, _prompt in page}
    problems: list[str] = []
    answered = []
    for who, batch in (("base", comparison.base_batch), ("adapter", comparison.adapter_batch)):
        answers: dict[int, compare.Answer] = {}
        try:
            if not (batch.done or batch.failed):  # as the poll last counted: no need to ask the cluster
                raise staging.NoResults(who)
            in_order, records = staging.results(batch, MAX_RECORD_BYTES)
        except staging.NoResults:
            problems.append(f"The {who}'s batch run has answered nothing yet.")
        except ssh.SSHError as exc:
            problems.append(f"The {who}'s answers cannot be read now: {batch.session.cluster.name}: {exc}")
        else:
            # In input order, the page's lines are among the first records up to its end; else any may be anywhere.
            bound = start_at + PAGE_SIZE if in_order else batch.prompts + 1
            try:
                with contextlib.closing(_iter(records)) as lines:
                    answers = compare.answers(lines, wanted, bound)
            except ssh.SSHError as exc:
                problems.append(f"The {who}'s answers cannot be read now: {exc}")
        answered.append(answers)
    return Page(compare.pair(page, answered[0], answered[1], references), number, page_count(comparison), problems)


def _iter(records: Iterator[bytes]) -> Generator[bytes]:
    """The records as a generator that closes the cluster's stream when the page has read enough."""
    try:
        yield from records
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()


def of_run(run: FineTuneRun) -> QuerySet[FineTuneComparison]:
    return run.comparisons.select_related(
        "base_batch__session__cluster",
        "adapter_batch__session__cluster",
        "run__variant__model",
        "run__owner",
        "launched_session",
    )


def states(comparison: FineTuneComparison) -> list[tuple[str, BatchRun]]:
    batches = comparison.batches
    if not batches:
        return []
    return [("base", batches[0]), (comparison.run.model_name, batches[1])]
