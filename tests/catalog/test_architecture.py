"""One definition of a model's architecture (catalog/architecture.py), and everything that follows from it."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from django.contrib import admin
from django.db import models

from catalog import architecture
from catalog.architecture import Architecture
from catalog.models import ModelCard
from catalog.yaml_io import MODEL_FIELDS, export_catalog


def test_the_model_card_has_a_column_of_the_right_kind_for_every_field() -> None:
    for name in architecture.FIELDS:
        column = ModelCard._meta.get_field(name)
        kind = {float: models.FloatField, bool: models.BooleanField}.get(
            architecture.field_type(name), models.IntegerField
        )
        assert isinstance(column, kind), name


def test_yaml_and_the_admin_show_every_field() -> None:
    yaml_keys = {f.key for f in MODEL_FIELDS} | {sub.key for f in MODEL_FIELDS for sub in f.group}
    assert set(architecture.FIELDS) <= yaml_keys
    fieldsets = admin.site._registry[ModelCard].fieldsets or []
    shown: set[str] = set()
    for _, options in fieldsets:
        for row in options["fields"]:
            shown |= set(row) if isinstance(row, tuple | list) else {row}
    assert set(architecture.FIELDS) <= shown


@pytest.mark.django_db
def test_a_card_reads_and_writes_the_architecture_whole(example_catalog: Path) -> None:
    card = ModelCard.objects.get(name="tiny-llama")
    arch = card.architecture
    assert [getattr(arch, f.name) for f in fields(Architecture)] == [
        getattr(card, f.name) for f in fields(Architecture)
    ]
    card.set_architecture(Architecture(0.5, 3, 96, 6, 3, 16, 300, 2048))
    card.full_clean()
    card.save()
    card.refresh_from_db()
    assert card.architecture == Architecture(0.5, 3, 96, 6, 3, 16, 300, 2048)
    assert "layers: 3" in export_catalog()
