"""A batch launch's run, for the tests of the engine and the pages: three prompts, waiting for its job."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile, UploadedFile
from django.utils.datastructures import MultiValueDict

from catalog.models import ClusterAccount
from jobs.batch.actions import launch
from jobs.batch.forms import BatchForm
from jobs.models import BatchRun
from tests.conftest import LAUNCH


@pytest.fixture
def run(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> BatchRun:
    files: MultiValueDict[str, UploadedFile] = MultiValueDict(
        {"prompts": [SimpleUploadedFile("p.txt", b"one\ntwo\nthree\n")]}
    )
    form = BatchForm({"max_tokens": 5}, files)
    assert form.is_valid(), form.errors
    assert form.checked is not None
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**LAUNCH, "purpose": "batch"}, batch=form.checked)
    return BatchRun.objects.get(session=session)
