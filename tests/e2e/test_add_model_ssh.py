"""`catalog add-model --cluster`: the GGUF header is read on the cluster over SSH, never the whole file."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from catalog.models import VariantLocation
from portal import ssh
from tests.e2e.sessions import local_account

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]
TINY = "/var/lib/hpc-llm-portal/local-cluster/models/tiny-llama-f16.gguf"


def test_a_model_on_the_cluster_is_added_from_its_header(local_catalog: dict[str, Any], owner: Any) -> None:
    local_account(owner, local_catalog)
    out = StringIO()
    try:
        call_command("catalog", "add-model", TINY, "--cluster", "local", "--user", "ada", "--name", "tiny-from-ssh",
                     stdout=out)  # fmt: skip
    finally:
        ssh.pool.close_all()
    assert "GGUF v3 header (llama, 107,200 parameters)" in out.getvalue()
    location = VariantLocation.objects.select_related("variant__model").get(variant__model__name="tiny-from-ssh")
    assert (location.path, location.variant.quantization, location.variant.model.layers) == (TINY, "fp16", 2)


def test_a_missing_file_on_the_cluster_is_a_clear_error(local_catalog: dict[str, Any], owner: Any) -> None:
    local_account(owner, local_catalog)
    try:
        with pytest.raises(CommandError, match=r"cannot read /nonexistent\.gguf"):
            call_command("catalog", "add-model", "/nonexistent.gguf", "--cluster", "local", "--user", "ada")
    finally:
        ssh.pool.close_all()
