"""A batch run's own choices, the same for a batch launch and a run on a running session: the prompts file (checked
whole by inputs.py before anything runs), its format, a system prompt, sampling defaults and requests at once."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import IO, Any

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError

from jobs.batch import inputs


@dataclass
class Checked:
    """A prompts file that passed: its requests JSONL (a temporary file) and what the run records about it."""

    requests: IO[bytes]
    columns: dict[str, Any]


def limits() -> inputs.Limits:
    return inputs.Limits(
        max_bytes=settings.PORTAL_BATCH_MAX_BYTES,
        max_line_bytes=settings.PORTAL_BATCH_MAX_LINE_BYTES,
        max_prompts=settings.PORTAL_BATCH_MAX_PROMPTS,
    )


class BatchForm(forms.Form):
    prompts = forms.FileField(
        label="prompts file",
        help_text="one prompt per line, JSONL with messages or prompt, or OpenAI's batch input (docs/batch.md)",
    )
    input_format = forms.ChoiceField(
        label="format",
        choices=[("", "detect from the first line"), *((f, f) for f in inputs.FORMATS)],
        required=False,
    )
    system_prompt = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=False, max_length=20_000)
    max_tokens = forms.IntegerField(required=False, min_value=1, max_value=1_000_000, help_text="per reply")
    temperature = forms.FloatField(required=False, min_value=0, max_value=2)
    concurrency = forms.IntegerField(
        required=False, min_value=1, max_value=256, help_text="requests at once per server; default: its slots"
    )
    replicas = forms.IntegerField(
        required=False, min_value=1, max_value=16,
        help_text="a batch launch's servers, one node each, sharing the prompts; default 1",
    )  # fmt: skip

    checked: Checked | None = None

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        upload = data.get("prompts")
        if self.errors or upload is None:
            return data
        defaults = {k: data[k] for k in ("max_tokens", "temperature") if data.get(k) is not None}
        options = inputs.Options(
            system_prompt=data.get("system_prompt", ""), defaults=defaults, format=data.get("input_format", "")
        )
        requests = tempfile.TemporaryFile()  # noqa: SIM115 -- handed on in self.checked, closed by its user
        upload.seek(0)
        try:
            summary = inputs.normalize(upload, requests, options, limits())
        except inputs.InputError as exc:
            requests.close()
            messages = [f"line {n}: {m}" if n else m for n, m in exc.errors]
            if exc.more:
                messages.append(f"... and {exc.more} more lines with errors")
            raise ValidationError({"prompts": messages}) from None
        requests.seek(0)
        self.checked = Checked(
            requests,
            {
                "name": (upload.name or "prompts")[:200],
                "input_format": summary.format,
                "endpoint": summary.url,
                "prompts": summary.prompts,
                "system_prompt": options.system_prompt,
                "defaults": defaults,
                "concurrency": data.get("concurrency"),
                "replicas": data.get("replicas") or 1,
            },
        )
        return data


def run_columns(checked: Checked, parallel: int) -> dict[str, Any]:
    """The BatchRun's columns; requests at once default to the server's parallel slots, and never exceed them."""
    columns = dict(checked.columns)
    columns["concurrency"] = min(columns["concurrency"] or parallel, parallel)
    return columns
