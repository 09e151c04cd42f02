from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest
import yaml
from django.core.management import CommandError, call_command
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from catalog.models import Cluster, GPUType, ModelCard, ModelVariant, NodeGroup, Partition, VariantLocation
from catalog.yaml_io import CatalogImportError, export_catalog, import_catalog

pytestmark = pytest.mark.django_db

BASE = textwrap.dedent(
    """\
    version: 1
    gpu_types:
      - name: rtx4090
        display_name: RTX 4090
        memory_gib: 24
        reserved_gib: 2
    runtimes:
      - kind: llama.cpp
        display_name: llama-server
    clusters:
      - slug: lab
        name: Lab
        login_host: gw.lab.example.edu
        partitions:
          - name: ws
            max_walltime_min: 600
            node_groups:
              - gpu_type: rtx4090
                gpus_per_node: 1
                nodes: 2
                cpus_per_node: 16
                ram_gib: 64
        runtimes:
          - runtime: llama.cpp
            binary: /opt/llama.cpp/bin/llama-server
            rpc_binary: /opt/llama.cpp/bin/rpc-server
    models:
      - name: Tiny
        family: llama
        params_b: 0.001
        architecture: {layers: 2, hidden_size: 64, attention_heads: 4, kv_heads: 2, head_dim: 16, vocab_size: 260, max_context: 2048}
        tags: [test]
        variants:
          - quant: f16
            format: gguf
            size_gib: 0.001
            locations:
              - cluster: lab
                path: /data/tiny.gguf
    """
)


def catalog_rows() -> dict[str, int]:
    models = [GPUType, Cluster, Partition, NodeGroup, ModelCard, ModelVariant, VariantLocation]
    return {m.__name__: m._default_manager.count() for m in models}


def errors_for(text: str) -> list[tuple[int, str, str]]:
    with pytest.raises(CatalogImportError) as exc:
        import_catalog(text, "cat.yaml")
    return [(e.line, e.path, e.message) for e in exc.value.errors]


def test_a_valid_file_creates_everything_it_names() -> None:
    report = import_catalog(BASE, "cat.yaml")
    assert catalog_rows() == {
        "GPUType": 1,
        "Cluster": 1,
        "Partition": 1,
        "NodeGroup": 1,
        "ModelCard": 1,
        "ModelVariant": 1,
        "VariantLocation": 1,
    }
    assert report.created["clusters"] == ["lab"]
    variant = ModelVariant.objects.get()
    assert variant.quantization == "fp16"  # "f16" is an alias, stored in the catalog's spelling
    assert Partition.objects.get().default_walltime_min == 60  # left out, so the model's default


def test_importing_twice_changes_nothing_the_second_time() -> None:
    import_catalog(BASE, "cat.yaml")
    report = import_catalog(BASE, "cat.yaml")
    assert not report.changed
    assert report.unchanged["node groups"] == ["lab/ws: 1 x rtx4090"]


def test_a_changed_value_updates_only_that_object() -> None:
    import_catalog(BASE, "cat.yaml")
    report = import_catalog(BASE.replace("max_walltime_min: 600", "max_walltime_min: 900"), "cat.yaml")
    assert report.updated["partitions"] == ["lab/ws"]
    assert report.updated["clusters"] == []
    assert Partition.objects.get().max_walltime_min == 900


def test_objects_missing_from_the_file_are_left_and_listed() -> None:
    import_catalog(BASE, "cat.yaml")
    Cluster.objects.create(slug="other", name="Other", login_host="o.example.edu")
    report = import_catalog(BASE, "cat.yaml")
    assert report.left["clusters"] == ["Other"]
    assert Cluster.objects.filter(slug="other").exists()


def test_dry_run_reports_but_changes_nothing() -> None:
    report = import_catalog(BASE, "cat.yaml", dry_run=True)
    assert report.created["clusters"] == ["lab"]
    assert sum(catalog_rows().values()) == 0


def test_export_then_import_round_trips_without_change(example_catalog: Path) -> None:
    exported = export_catalog()
    report = import_catalog(exported, "export.yaml")
    assert not report.changed, report.lines()
    before = catalog_rows()
    # Into an empty catalog, the export rebuilds the same catalog and exports to the same text.
    for model in (VariantLocation, ModelVariant, ModelCard, NodeGroup, Partition, Cluster, GPUType):
        model.objects.all().delete()
    import_catalog(exported, "export.yaml")
    assert catalog_rows() == before
    assert export_catalog() == exported


def test_example_catalog_describes_the_required_sites_and_models(example_catalog: Path) -> None:
    slugs = set(Cluster.objects.values_list("slug", flat=True))
    assert {"bouchet", "grace", "mccleary", "milgram", "lab", "v100", "local"} <= slugs
    assert NodeGroup.objects.filter(partition__cluster__slug="bouchet", gpu_type__name="h200").exists()
    assert NodeGroup.objects.filter(partition__cluster__slug="milgram", gpu_type__name="h100").exists()
    for slug in ("grace", "mccleary"):
        assert NodeGroup.objects.filter(partition__cluster__slug=slug, gpu_type__name="a100-80g").exists()
    lab_gpus = set(NodeGroup.objects.filter(partition__cluster__slug="lab").values_list("gpu_type__name", flat=True))
    assert lab_gpus == {"rtx4090", "rtx3090ti"}
    assert GPUType.objects.get(name="v100-32g").memory_gib >= 31
    reflection = ModelCard.objects.get(name="Reflection-Llama-3.1-70B")
    assert set(reflection.variants.values_list("quantization", flat=True)) == {"Q4_K_S", "Q6_K_L"}
    names = set(ModelCard.objects.values_list("name", flat=True))
    for expected in (
        "Llama-3.1-8B-Instruct",
        "Llama-3.1-70B-Instruct",
        "Llama-3.3-70B-Instruct",
        "Mistral-7B-v0.3",
        "Mistral-7B-Instruct-v0.3",
        "Llama-2-7b-chat",
        "Llama-2-13b-chat",
        "Falcon-7B-Instruct",
        "GPT-2",
    ):
        assert expected in names
    l70 = ModelCard.objects.get(name="Llama-3.1-70B-Instruct")
    assert (l70.layers, l70.hidden_size, l70.attention_heads, l70.kv_heads, l70.head_dim) == (
        80,
        8192,
        64,
        8,
        128,
    )


# --- every class of bad input: named by line and path, and nothing changes ----------------------------------


def test_invalid_yaml_names_the_line() -> None:
    errors = errors_for("version: 1\ngpu_types:\n  - name: [unclosed\n")
    assert len(errors) == 1
    line, _, message = errors[0]
    assert line == 4
    assert message.startswith("invalid YAML")


def test_a_nul_character_in_a_value_or_key_is_a_located_error() -> None:
    """PostgreSQL refuses NUL in text; the file says where it is instead of the database failing mid-import."""
    errors = errors_for(BASE.replace("    name: Lab\n", '    name: "La\\0b"\n    "co\\0lour": blue\n'))
    assert [(path, "NUL" in message) for _, path, message in errors] == [
        ("clusters[0].name", True),
        ("clusters[0]", True),
    ]
    assert all(line > 1 for line, _, _ in errors)
    assert sum(catalog_rows().values()) == 0


def test_unknown_keys_are_rejected_with_the_keys_that_would_work() -> None:
    errors = errors_for(BASE.replace("    name: Lab\n", "    name: Lab\n    colour: blue\n"))
    assert errors == [(13, "clusters[0].colour", errors[0][2])]
    assert "unknown key 'colour'" in errors[0][2] and "login_host" in errors[0][2]
    errors = errors_for("bogus: 1\n")
    assert errors[0][:2] == (1, "bogus")


@pytest.mark.parametrize(
    ("old", "new", "path", "fragment"),
    [
        (
            "memory_gib: 24",
            "memory_gib: twenty-four",
            "gpu_types[0].memory_gib",
            "must be a number, got text",
        ),
        (
            "max_walltime_min: 600",
            "max_walltime_min: 10.5",
            "clusters[0].partitions[0].max_walltime_min",
            "must be a whole number",
        ),
        (
            "nodes: 2",
            "nodes: true",
            "clusters[0].partitions[0].node_groups[0].nodes",
            "must be a whole number",
        ),
        ("tags: [test]", "tags: test", "models[0].tags", "must be a list of text items"),
        (
            "    runtimes:\n      - runtime: llama.cpp\n        binary: /opt/llama.cpp/bin/llama-server\n"
            "        rpc_binary: /opt/llama.cpp/bin/rpc-server\n",
            "    runtimes: llama.cpp\n",
            "clusters[0].runtimes",
            "must be a list",
        ),
        ("display_name: RTX 4090", "display_name: [a, b]", "gpu_types[0].display_name", "must be text"),
    ],
)
def test_wrong_types_name_the_field(old: str, new: str, path: str, fragment: str) -> None:
    assert old in BASE
    errors = errors_for(BASE.replace(old, new, 1))
    assert [e[1] for e in errors] == [path]
    assert fragment in errors[0][2]
    text_lines = BASE.replace(old, new, 1).splitlines()
    assert path.rsplit(".", 1)[-1].split("[")[0] in text_lines[errors[0][0] - 1]


def test_negative_memory_is_refused_by_the_models_own_validation() -> None:
    errors = errors_for(BASE.replace("memory_gib: 24", "memory_gib: -24"))
    assert (5, "gpu_types[0].memory_gib") in [(line, path) for line, path, _ in errors]


def test_a_tool_call_parser_imports_exports_and_an_unknown_one_is_an_error_at_its_line() -> None:
    text = BASE.replace("    tags: [test]\n", "    tool_call_parser: hermes\n    tags: [test]\n", 1)
    assert text != BASE
    import_catalog(text, "cat.yaml")
    assert ModelCard.objects.get(name="Tiny").tool_call_parser == "hermes"
    assert "\n  tool_call_parser: hermes\n" in export_catalog()  # the export indents lists less
    assert not import_catalog(export_catalog(), "export.yaml").changed
    bad = text.replace("tool_call_parser: hermes", "tool_call_parser: qwen2_5")
    line = bad.splitlines().index("    tool_call_parser: qwen2_5") + 1
    [(at, path, message)] = errors_for(bad)
    assert (at, path) == (line, "models[0].tool_call_parser")
    assert "'qwen2_5' is not a tool-call parser vLLM 0.32 knows: e.g. hermes" in message


def test_unknown_gpu_type_runtime_and_cluster_references() -> None:
    text = (
        BASE.replace("- gpu_type: rtx4090", "- gpu_type: rtx9090")
        .replace("- runtime: llama.cpp", "- runtime: llamafile")
        .replace("- cluster: lab", "- cluster: nowhere")
    )
    errors = errors_for(text)
    assert [(e[0], e[1]) for e in errors] == [
        (18, "clusters[0].partitions[0].node_groups[0].gpu_type"),
        (24, "clusters[0].runtimes[0].runtime"),
        (38, "models[0].variants[0].locations[0].cluster"),
    ]
    assert "unknown GPU type 'rtx9090'" in errors[0][2]


def test_duplicate_entries_and_duplicate_keys() -> None:
    doubled = BASE.replace("models:\n", "  - slug: lab\n    name: Lab again\n    login_host: x.example.edu\nmodels:\n")
    errors = errors_for(doubled)
    assert errors[0][1] == "clusters[1]"
    assert "duplicate cluster 'lab': already defined at line 11" in errors[0][2]
    errors = errors_for(BASE.replace("    reserved_gib: 2\n", "    reserved_gib: 2\n    memory_gib: 23\n"))
    assert errors[0][:2] == (7, "gpu_types[0].memory_gib")
    assert "appears twice" in errors[0][2]
    errors = errors_for(
        BASE.replace(
            "      - quant: f16\n",
            "      - quant: fp16\n        format: gguf\n        size_gib: 1\n      - quant: f16\n",
        )
    )
    assert any("duplicate variant 'fp16'" in e[2] for e in errors)


def test_missing_required_keys_point_at_their_entry() -> None:
    errors = errors_for(BASE.replace("    login_host: gw.lab.example.edu\n", ""))
    assert errors == [(11, "clusters[0]", "'login_host' is required")]


def test_a_missing_or_malformed_architecture_block_is_one_error_not_one_per_field() -> None:
    arch = "    architecture: {layers: 2, hidden_size: 64, attention_heads: 4, kv_heads: 2, head_dim: 16, vocab_size: 260, max_context: 2048}\n"
    assert arch in BASE
    assert errors_for(BASE.replace(arch, "")) == [(28, "models[0]", "'architecture' is required")]
    errors = errors_for(BASE.replace(arch, "    architecture: big\n"))
    assert [(e[0], e[1]) for e in errors] == [(31, "models[0].architecture")]
    errors = errors_for(BASE.replace("kv_heads: 2,", ""))
    assert [(e[0], e[1], e[2]) for e in errors] == [(31, "models[0].architecture", "'kv_heads' is required")]


def test_unsupported_version_empty_file_and_wrong_top_level() -> None:
    assert "unsupported format version" in errors_for("version: 2\n")[0][2]
    assert "the file is empty" in errors_for("")[0][2]
    assert "mapping at the top level" in errors_for("- a\n- b\n")[0][2]


def test_one_bad_entry_late_in_the_file_rolls_back_everything_before_it() -> None:
    bad = BASE.replace("size_gib: 0.001", "size_gib: -1")
    errors = errors_for(bad)
    assert errors[0][1] == "models[0].variants[0].size_gib"
    assert sum(catalog_rows().values()) == 0


def test_all_errors_are_reported_in_one_run_including_under_a_bad_parent() -> None:
    text = BASE.replace("login_host: gw.lab.example.edu", "login_host: 'gw lab'").replace(
        "max_walltime_min: 600", "max_walltime_min: 600\n        default_walltime_min: 900"
    )
    paths = [e[1] for e in errors_for(text)]
    assert paths == ["clusters[0].login_host", "clusters[0].partitions[0].default_walltime_min"]


def test_command_exits_non_zero_and_prints_file_line_and_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BASE.replace("memory_gib: 24", "memory_gib: -24"))
    err = io.StringIO()
    with pytest.raises(CommandError, match="nothing was changed"):
        call_command("catalog", "import", str(path), stderr=err)
    assert f"{path}:5: gpu_types[0].memory_gib:" in err.getvalue()
    err = io.StringIO()
    with pytest.raises(CommandError):
        call_command("catalog", "import", str(tmp_path / "missing.yaml"), stderr=err)
    assert "missing.yaml:0: no such file" in err.getvalue()
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    err = io.StringIO()
    with pytest.raises(CommandError):
        call_command("catalog", "import", str(binary), stderr=err)
    assert "not UTF-8" in err.getvalue()


def test_command_import_and_export_files(tmp_path: Path) -> None:
    source = tmp_path / "in.yaml"
    source.write_text(BASE)
    out = io.StringIO()
    call_command("catalog", "import", str(source), "--dry-run", stdout=out)
    assert "Dry run" in out.getvalue() and not Cluster.objects.exists()
    call_command("catalog", "import", str(source), stdout=io.StringIO())
    target = tmp_path / "out.yaml"
    call_command("catalog", "export", str(target), stdout=io.StringIO())
    assert yaml.safe_load(target.read_text())["clusters"][0]["slug"] == "lab"
    out = io.StringIO()
    call_command("catalog", "import", str(target), stdout=out)
    assert "already matches" in out.getvalue()


# --- property: no input crashes the importer or half-applies ----------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=20),
    st.lists(st.text(max_size=5), max_size=3),
)


def _leaf_paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaf_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaf_paths(value, (*prefix, index))
    else:
        yield prefix


LEAVES = list(_leaf_paths(yaml.safe_load(BASE)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(replacements=st.lists(st.tuples(st.sampled_from(LEAVES), SCALARS), min_size=1, max_size=3))
@example(replacements=[(("gpu_types", 0, "name"), "\x00")])  # once a database error on PostgreSQL
def test_any_value_anywhere_imports_cleanly_or_fails_with_located_errors(replacements) -> None:
    data = yaml.safe_load(BASE)
    for path, value in replacements:
        node = data
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    text = yaml.safe_dump(data, sort_keys=False)
    for model in (VariantLocation, ModelVariant, ModelCard, NodeGroup, Partition, Cluster, GPUType):
        model.objects.all().delete()
    try:
        import_catalog(text, "fuzz.yaml")
    except CatalogImportError as exc:
        assert exc.errors
        assert all(e.line >= 1 and e.message for e in exc.errors)
        assert sum(catalog_rows().values()) == 0


def test_aliases_that_expand_beyond_the_bound_are_refused(db: None) -> None:
    """A 'billion laughs' file: ten kilobytes of YAML standing for ten billion values."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        name, previous = chr(97 + i), chr(96 + i)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 10) + "]")
    with pytest.raises(CatalogImportError, match="YAML aliases"):
        import_catalog("\n".join(lines), "bomb.yaml")


def test_nesting_too_deep_for_a_catalog_is_refused(db: None) -> None:
    with pytest.raises(CatalogImportError, match="too deeply"):
        import_catalog("gpu_types: " + "[" * 5000 + "]" * 5000, "deep.yaml")
