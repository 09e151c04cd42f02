"""A batch launch's run, for the tests of the engine and the pages: three prompts, waiting for its job."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils.datastructures import MultiValueDict

from catalog.models import ClusterAccount
from jobs.batch.forms import BatchForm
from jobs.models import BatchRun
from jobs.sessions.actions import launch
from tests.conftest import LAUNCH


@pytest.fixture
def run(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> BatchRun:
    files = MultiValueDict({"prompts": [SimpleUploadedFile("p.txt", b"one\ntwo\nthree\n")]})
    form = BatchForm({"max_tokens": 5}, files)
    assert form.is_valid(), form.errors
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**LAUNCH, "purpose": "batch"}, batch=form.checked)
    return BatchRun.objects.get(session=session)
