"""One table of runtime rules (catalog/runtime_rules.py): the catalog, the estimator, plans and the launch form follow
it."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.exceptions import ValidationError

from catalog import runtime_rules
from catalog.architecture import Architecture
from catalog.estimate import EstimateError, Request, estimate
from catalog.models import Cluster, ClusterRuntime, Runtime
from catalog.quant import QUANTS

TINY = Architecture(0.0001, 2, 64, 4, 2, 16, 259, 4096)


def test_the_catalogs_runtime_kinds_are_the_launchable_rows() -> None:
    choices = [value for value, _ in Runtime._meta.get_field("kind").choices or []]
    assert choices == list(runtime_rules.LAUNCHABLE)


@pytest.mark.parametrize("kind", list(runtime_rules.RUNTIMES))
@pytest.mark.parametrize("quant", ["Q4_K_M", "AWQ", "fp16"])
def test_the_estimator_takes_exactly_the_formats_a_runtime_serves(kind: str, quant: str) -> None:
    rules = runtime_rules.RUNTIMES[kind]
    serves = bool(set(rules.formats) & set(QUANTS[quant].formats))
    try:
        estimate(Request(arch=TINY, quant=quant, runtime=kind, context=1024))
        took = True
    except EstimateError as exc:
        took = False
        assert rules.serves_text in str(exc)
    assert took == serves


@pytest.mark.parametrize("kind", list(runtime_rules.RUNTIMES))
def test_only_runtimes_that_span_nodes_are_estimated_on_several(kind: str) -> None:
    request = Request(arch=TINY, quant="fp16", runtime=kind, context=1024, nodes=2)
    if runtime_rules.RUNTIMES[kind].multi_node:
        assert len(estimate(request).per_gpu_gib) == 2
    else:
        with pytest.raises(EstimateError, match="single node"):
            estimate(request)


@pytest.mark.django_db
@pytest.mark.parametrize("setting", ["rpc_binary", "model_dir"])
def test_cluster_settings_a_runtime_does_not_use_are_refused(example_catalog: Path, setting: str) -> None:
    cluster = Cluster.objects.get(slug="local")
    for kind in runtime_rules.LAUNCHABLE:
        rules = runtime_rules.RUNTIMES[kind]
        runtime, _ = Runtime.objects.get_or_create(kind=kind, defaults={"display_name": rules.label})
        install = ClusterRuntime(cluster=cluster, runtime=runtime, binary="server", **{setting: "/opt/x"})
        try:
            install.clean()
            refused = False
        except ValidationError as exc:
            refused = setting in exc.message_dict
        assert refused != getattr(rules, setting), kind
