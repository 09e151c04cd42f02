"""`catalog scan` against the live local cluster over SSH: a GGUF (the real SmolLM2, linked), a split GGUF, a Hugging
Face directory and an ollama store are found and added, a truncated file is skipped with the reason, and a second
scan finds everything unchanged."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from catalog.models import ModelCard, VariantLocation
from portal import ssh
from tests.catalog.test_scan import write_gguf, write_hf, write_ollama
from tests.conftest import REPO
from tests.e2e.sessions import local_account

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]


@pytest.fixture
def models_dir(local_catalog: dict[str, Any]) -> Iterator[Path]:
    """A directory the cluster's user reads (pytest's own temporary directories are private)."""
    root = Path(tempfile.mkdtemp(prefix="scan-models-", dir="/tmp"))
    root.chmod(0o755)
    (root / "gguf").mkdir()
    os.symlink(local_catalog["models"]["smollm2"], root / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    write_gguf(root / "gguf" / "Scan-Split-Q8_0.gguf", split=1)
    write_hf(root / "hf" / "Scan-HF")
    tiny = root / "tiny-llama-f16.gguf"
    subprocess.run([sys.executable, str(REPO / "scripts" / "tiny-gguf"), str(tiny)], check=True, capture_output=True)
    write_ollama(root / "ollama", {"scan-tiny:2m": tiny})
    (root / "gguf" / "Scan-Cut-fp16.gguf").write_bytes(tiny.read_bytes()[:-4096])
    tiny.unlink()
    yield root
    shutil.rmtree(root)


def test_scan_finds_every_kind_of_model_on_the_cluster_and_a_second_scan_changes_nothing(
    local_catalog: dict[str, Any], owner: Any, models_dir: Path
) -> None:
    local_account(owner, local_catalog)
    try:
        dry = StringIO()
        call_command("catalog", "scan", "local", str(models_dir), "--user", "ada", "--dry-run", stdout=dry)
        assert not ModelCard.objects.filter(name="Scan-HF").exists()
        first = StringIO()
        call_command("catalog", "scan", "local", str(models_dir), "--user", "ada", stdout=first)
        second = StringIO()
        call_command("catalog", "scan", "local", str(models_dir), "--user", "ada", stdout=second)
    finally:
        ssh.pool.close_all()
    assert "Dry run (4 added, 0 updated, 0 unchanged, 1 skipped)" in dry.getvalue(), dry.getvalue()
    text = first.getvalue()
    assert "4 added, 0 updated, 0 unchanged, 1 skipped" in text, text
    assert f"skipped   {models_dir}/gguf/Scan-Cut-fp16.gguf: truncated: 218,944 bytes" in text
    locations = {
        loc.variant.model.name: (loc.variant.quantization, loc.variant.format, loc.path, loc.ollama_tag)
        for loc in VariantLocation.objects.filter(cluster__slug="local").select_related("variant__model")
    }
    assert locations["SmolLM2-135M-Instruct"] == ("Q4_1", "gguf", f"{models_dir}/gguf/SmolLM2-135M-Instruct.Q4_1.gguf",
                                                  "")  # fmt: skip
    assert locations["Scan-Split"][2] == f"{models_dir}/gguf/Scan-Split-Q8_0-00001-of-00003.gguf"
    assert locations["Scan-HF"][:3] == ("bf16", "safetensors", f"{models_dir}/hf/Scan-HF")
    quant, fmt, blob, tag = locations["scan-tiny-2m"]
    assert (quant, fmt, tag) == ("fp16", "gguf", "scan-tiny:2m") and blob.startswith(f"{models_dir}/ollama/blobs/")
    assert ModelCard.objects.get(name="SmolLM2-135M-Instruct").layers == 30  # from its own header, over SSH
    assert "0 added, 0 updated, 4 unchanged, 1 skipped" in second.getvalue(), second.getvalue()
