"""Every catalog value a session's job runs or loads is one catalog/models/runs_code.py guards: change any other text
of the catalog's rows behind a session and the program, modules, flags, paths and model its job script gets stay the
same (the rest reaches the script only as allow-listed #SBATCH values)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from django.db import models

from catalog.models import RUNS_CODE, ClusterAccount, ClusterRuntime, NodeGroup, VariantLocation
from jobs.cluster.jobscript import RenderError, render
from jobs.models import LLMSession
from jobs.sessions import lifecycle
from jobs.sessions.actions import launch
from tests.conftest import LAUNCH

pytestmark = pytest.mark.django_db

# The JobSpec values that decide what runs as the researcher (not #SBATCH lines, not the session's own choices).
RUNS = ("binary", "rpc_binary", "model_dir", "model_path", "ollama_tag", "stage_to", "modules", "default_flags",
        "extra_flags")  # fmt: skip


def rows_behind(session: LLMSession) -> list[models.Model]:
    cluster_runtime = ClusterRuntime.objects.get(cluster=session.cluster, runtime=session.runtime)
    location = VariantLocation.objects.get(variant=session.variant, cluster=session.cluster)
    return [session.cluster, session.runtime, cluster_runtime, location, session.variant, session.variant.model,
            session.partition, session.gpu_type, *NodeGroup.objects.filter(partition=session.partition),
            session.account]  # fmt: skip


def test_no_catalog_text_outside_runs_code_changes_what_a_job_runs_or_loads(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**LAUNCH, "runtime": "llama.cpp"})
    before = {name: getattr(lifecycle.job_spec(session), name) for name in RUNS}
    assert before["binary"] and before["model_path"]
    changed = []
    for row in rows_behind(session):
        model = type(row)
        for field in model._meta.concrete_fields:
            guarded = field.name in RUNS_CODE.get(model, ())
            if isinstance(field, models.CharField | models.TextField) and not field.choices and not guarded:
                model._default_manager.filter(pk=row.pk).update(**{field.name: "zz"})
                changed.append(f"{model.__name__}.{field.name}")
    assert "Cluster.login_host" in changed and "ModelCard.name" in changed
    after = lifecycle.job_spec(LLMSession.objects.get(pk=session.pk))
    assert {name: getattr(after, name) for name in RUNS} == before
    assert set(RUNS) <= {f.name for f in dataclasses.fields(after)}


def test_a_cards_tool_call_parser_reaches_vllm_only_as_one_of_its_own_names(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """Not in RUNS_CODE though vLLM's command line gets it: a name from a fixed list runs no code of anyone's
    (the plugin file vLLM could load instead, the portal never passes)."""
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**LAUNCH, "runtime": "llama.cpp"})
    card = session.variant.model
    type(card)._default_manager.filter(pk=card.pk).update(tool_call_parser="hermes --tool-parser-plugin /tmp/x.py")
    spec = dataclasses.replace(lifecycle.job_spec(LLMSession.objects.get(pk=session.pk)), runtime="vllm")
    with pytest.raises(RenderError, match="not one of vLLM's tool-call parsers"):
        render(spec)
