"""Catalog import and export as YAML.

The file is declarative: each object it names ends up exactly as written (fields left out take their defaults);
objects it does not name are left as they are and listed in the report. Objects are matched by natural keys:
GPU type name, runtime kind, cluster slug, partition name within its cluster, node group (GPU type, GPUs per node)
within its partition, model name, quantisation within its model, and cluster within a variant's locations.

Import is all-or-nothing: it runs in one transaction, collects every error it can find (each naming the file, the
line and the path of the field), and rolls back if there is any.

What runs as every researcher (catalog/models/runs_code.py) changes only with `may_change_code`: `manage.py catalog
import` is an operator's own act and may; an import on someone's behalf (the admin's discovery) passes whether they
hold the permission, and a change to those fields is then an error like any other.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import models, transaction

from catalog import architecture
from catalog.models import (
    CODE_PERMISSION,
    Cluster,
    ClusterRuntime,
    GPUType,
    ModelCard,
    ModelVariant,
    NodeGroup,
    Partition,
    Runtime,
    VariantLocation,
)
from catalog.models.runs_code import changed_code
from catalog.quant import canonical_quant

FORMAT_VERSION = 1

Path = tuple[str | int, ...]


# --- Reading YAML with line numbers -------------------------------------------------------------------------


@dataclass
class Located:
    """Plain Python data read from YAML plus the 1-based line of every mapping key and sequence item."""

    data: Any
    lines: dict[Path, int]


# A catalog file of every site we know is a few thousand values. YAML aliases (*name) repeat a node wherever they
# appear, so a small file can stand for billions of values ("billion laughs"); reading stops at this many.
MAX_VALUES = 200_000


class _TooLarge(Exception):
    pass


def _to_python(
    loader: yaml.SafeLoader, node: yaml.Node, path: Path, lines: dict[Path, int], errors: list[tuple[int, Path, str]]
) -> Any:
    if len(lines) > MAX_VALUES:
        raise _TooLarge
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<) like the safe loader does
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                errors.append((line, path, f"keys must be text, got {key!r}"))
                continue
            if "\x00" in key:
                errors.append((line, path, f"key {key!r} contains a NUL character (\\0)"))
                continue
            if key in result:
                errors.append(
                    (
                        line,
                        (*path, key),
                        f"key {key!r} appears twice in this mapping (first at line {lines[(*path, key)]})",
                    )
                )
                continue
            lines[(*path, key)] = line
            result[key] = _to_python(loader, value_node, (*path, key), lines, errors)
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            items.append(_to_python(loader, item, (*path, index), lines, errors))
        return items
    value = loader.construct_object(node, deep=True)
    if isinstance(value, str) and "\x00" in value:
        # PostgreSQL cannot store it in a text column; SQLite would keep a value no tool shows whole.
        errors.append((node.start_mark.line + 1, path, "contains a NUL character (\\0), which text cannot hold"))
    return value


def read_yaml(text: str) -> tuple[Located | None, list[tuple[int, Path, str]]]:
    """Parse YAML into plain data with line numbers; syntax errors come back as (line, path, message)."""
    errors: list[tuple[int, Path, str]] = []
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return Located(None, {}), []
        lines: dict[Path, int] = {}
        data = _to_python(loader, node, (), lines, errors)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        message = " ".join(part for part in (exc.context, exc.problem) if part) or str(exc)
        return None, [(line, (), f"invalid YAML: {message}")]
    except yaml.YAMLError as exc:
        return None, [(1, (), f"invalid YAML: {exc}")]
    except _TooLarge:
        return None, [(1, (), f"the file stands for more than {MAX_VALUES:,} values once its YAML aliases (*name) "
                              "are expanded; write the entries out instead")]  # fmt: skip
    except RecursionError:
        return None, [(1, (), "the file nests mappings and lists too deeply to be a catalog")]
    finally:
        loader.dispose()
    return Located(data, lines), errors


# --- Field specifications -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class F:
    """One key of a YAML mapping: its type, and the model attribute it sets (None for children/references)."""

    key: str
    kind: str  # str | int | float | bool | strlist | list | group
    attr: str | None = None
    required: bool = False
    joiner: str = ","  # how a strlist is stored in a text column
    group: tuple[F, ...] = ()

    @property
    def target(self) -> str | None:
        return self.attr if self.attr is not None else (None if self.kind in ("list", "ref") else self.key)


GPU_FIELDS = (
    F("name", "str", required=True),
    F("display_name", "str", required=True),
    F("gres_type", "str"),
    F("constraint", "str"),
    F("memory_gib", "float", required=True),
    F("reserved_gib", "float"),
    F("compute_capability", "str"),
    F("bandwidth_gbs", "float"),
    F("vendor", "str"),
)
RUNTIME_FIELDS = (
    F("kind", "str", required=True),
    F("display_name", "str", required=True),
    F("description", "str"),
    F("default_flags", "str"),
)
NODE_GROUP_FIELDS = (
    F("gpu_type", "ref", required=True),
    F("gpus_per_node", "int", required=True),
    F("nodes", "int", attr="node_count", required=True),
    F("cpus_per_node", "int", required=True),
    F("ram_gib", "float", required=True),
    F("features", "strlist", joiner=","),
)
PARTITION_FIELDS = (
    F("name", "str", required=True),
    F("max_walltime_min", "int", required=True),
    F("default_walltime_min", "int"),
    F("debug", "bool", attr="is_debug"),
    F("allowed_accounts", "strlist", joiner=","),
    F("allowed_qos", "strlist", joiner=","),
    F("node_groups", "list"),
)
CLUSTER_RUNTIME_FIELDS = (
    F("runtime", "ref", required=True),
    F("modules", "strlist", joiner=" "),
    F("binary", "str", required=True),
    F("rpc_binary", "str"),
    F("model_dir", "str"),
    F("extra_flags", "str"),
)
CLUSTER_FIELDS = (
    F("slug", "str", required=True),
    F("name", "str", required=True),
    F("login_host", "str", required=True),
    F("ssh_port", "int"),
    F("host_key", "str"),
    F("node_access", "str"),
    F("node_networks", "strlist", joiner=", "),
    F("default_account", "str"),
    F("slurm_cluster", "str"),
    F("slurm_bin_dir", "str"),
    F("stage_to", "str"),
    F("stage_keep", "bool"),
    F("max_sessions_per_user", "int"),
    F("max_gpus_per_user", "int"),
    F("notes", "str"),
    F("partitions", "list"),
    F("runtimes", "list"),
)
# A model's shape, from the one definition of its architecture; the size (params_b) stands with the name.
ARCH_FIELDS = tuple(
    F(name, architecture.field_type(name).__name__, required=name not in architecture.OPTIONAL_FIELDS)
    for name in architecture.SHAPE_FIELDS
)
LOCATION_FIELDS = (
    F("cluster", "ref", required=True),
    F("path", "str"),
    F("ollama_tag", "str"),
)
VARIANT_FIELDS = (
    F("quant", "str", attr="quantization", required=True),
    F("format", "str", required=True),
    F("size_gib", "float", required=True),
    F("locations", "list"),
)
MODEL_FIELDS = (
    F("name", "str", required=True),
    F("family", "str", required=True),
    F(architecture.SIZE_FIELD, architecture.field_type(architecture.SIZE_FIELD).__name__, required=True),
    F("architecture", "group", required=True, group=ARCH_FIELDS),
    F("license", "str"),
    F("tool_call_parser", "str"),
    F("tags", "strlist"),
    F("description", "str"),
    F("variants", "list"),
)
TOP_LEVEL = ("version", "gpu_types", "runtimes", "clusters", "models")


def _flat(spec: tuple[F, ...]) -> Iterator[F]:
    for f in spec:
        if f.kind == "group":
            yield from f.group
        else:
            yield f


# --- Import ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogError:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


class CatalogImportError(Exception):
    def __init__(self, errors: list[CatalogError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


@dataclass
class ImportReport:
    created: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    updated: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    unchanged: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    left: dict[str, list[str]] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any(self.created.values()) or any(self.updated.values())

    def lines(self) -> list[str]:
        out = []
        for kind in ENTITY_LABELS.values():
            c, u, n = self.created.get(kind, []), self.updated.get(kind, []), self.unchanged.get(kind, [])
            if not (c or u or n or self.left.get(kind)):
                continue
            out.append(f"{kind}: {len(c)} created, {len(u)} updated, {len(n)} unchanged")
            out.extend(f"  + {name}" for name in c)
            out.extend(f"  ~ {name}" for name in u)
            left = self.left.get(kind, [])
            if left:
                out.append(f"  {len(left)} in the catalog but not in this file, left as they are: {', '.join(left)}")
        return out


ENTITY_LABELS: dict[type[models.Model], str] = {
    GPUType: "GPU types",
    Runtime: "runtimes",
    Cluster: "clusters",
    Partition: "partitions",
    NodeGroup: "node groups",
    ClusterRuntime: "cluster runtimes",
    ModelCard: "models",
    ModelVariant: "model variants",
    VariantLocation: "model locations",
}


def path_text(path: Path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


class _Rollback(Exception):
    pass


class _Importer:
    def __init__(self, located: Located, filename: str, may_change_code: bool = True) -> None:
        self.lines = located.lines
        self.data = located.data
        self.filename = filename
        self.may_change_code = may_change_code
        self.errors: list[CatalogError] = []
        self.report = ImportReport()
        self.touched: dict[type[models.Model], set[int]] = defaultdict(set)
        self.seen: dict[tuple[object, ...], Path] = {}
        # Fields already reported by read(), so full_clean() does not report them again as blank; and natural
        # keys of objects that failed, so references to them are not reported as unknown.
        self.bad_fields: set[Path] = set()
        self.failed: set[tuple[str, str]] = set()

    # errors and lines
    def line_of(self, path: Path) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def error(self, path: Path, message: str) -> None:
        self.errors.append(CatalogError(self.filename, self.line_of(path), path_text(path), message))

    # reading values
    def read(self, value: Any, path: Path, spec: tuple[F, ...], what: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check one mapping against its spec; return (model attributes, child lists/references by key)."""
        if not isinstance(value, dict):
            self.error(path, f"each entry of {what} must be a mapping of keys to values, got {_type_name(value)}")
            return {}, {}
        attrs: dict[str, Any] = {}
        children: dict[str, Any] = {}
        allowed = {f.key for f in spec}
        for key in value:
            if key not in allowed:
                self.error((*path, key), f"unknown key {key!r}; expected one of: {', '.join(sorted(allowed))}")
        for f in spec:
            fpath = (*path, f.key)
            if f.key not in value or value[f.key] is None:
                if f.required:
                    self.error(path if f.key not in value else fpath, f"{f.key!r} is required")
                    self.bad_fields.add(fpath)
                    self.bad_fields.update((*fpath, sub.key) for sub in f.group)
                elif f.kind == "list":
                    children[f.key] = []
                elif f.kind == "group":
                    pass
                elif f.target:
                    attrs[f.target] = _model_default(spec, f)
                continue
            raw = value[f.key]
            if f.kind == "group":
                if not isinstance(raw, dict):
                    self.bad_fields.update((*fpath, sub.key) for sub in f.group)
                sub_attrs, _ = self.read(raw, fpath, f.group, f.key)
                attrs.update(sub_attrs)
            elif f.kind == "list":
                if not isinstance(raw, list):
                    self.error(fpath, f"must be a list, got {_type_name(raw)}")
                    self.bad_fields.add(fpath)
                    children[f.key] = []
                else:
                    children[f.key] = raw
            elif f.kind == "ref":
                if not isinstance(raw, str) or not raw:
                    self.error(fpath, f"must be text naming an existing {f.key}, got {_type_name(raw)}")
                else:
                    children[f.key] = raw
            else:
                ok, converted = _convert(f, raw)
                if not ok:
                    self.error(fpath, converted)
                    self.bad_fields.add(fpath)
                elif f.target:
                    attrs[f.target] = converted
        return attrs, children

    def duplicate(self, key: tuple[object, ...], path: Path, label: str) -> bool:
        if key in self.seen:
            self.error(path, f"duplicate {label}: already defined at line {self.line_of(self.seen[key])}")
            return True
        self.seen[key] = path
        return False

    def upsert(
        self,
        model: type[models.Model],
        lookup: dict[str, Any],
        attrs: dict[str, Any],
        path: Path,
        spec: tuple[F, ...],
        label: str,
    ) -> Any:
        # A parent that failed validation is None here: its children are still checked, without saving, so
        # one run reports every problem in the file.
        missing = [name for name, value in lookup.items() if value is None]
        obj = None if missing else model._default_manager.filter(**lookup).first()
        created = obj is None
        if obj is None:
            obj = model(**{name: value for name, value in lookup.items() if value is not None})
        before = None if created else _snapshot(obj)
        for name, value in attrs.items():
            setattr(obj, name, value)
        try:
            obj.full_clean(exclude=missing or None, validate_unique=not missing, validate_constraints=not missing)
            if missing:
                return None
        except ValidationError as exc:
            by_attr = {f.target: f.key for f in _flat(spec) if f.target}
            for name, messages in exc.message_dict.items():
                if name == NON_FIELD_ERRORS or name not in by_attr:
                    where = path if name == NON_FIELD_ERRORS else (*path, name)
                else:
                    where = (*path, *_group_path(spec, by_attr[name]))
                if where in self.bad_fields:
                    continue
                for message in messages:
                    self.error(where, message)
            return None
        if not self.may_change_code and self.refused_code(obj, before, path, spec):
            return None
        kind = ENTITY_LABELS[model]
        if created:
            obj.save()
            self.report.created[kind].append(label)
        elif before != _snapshot(obj):
            obj.save()
            self.report.updated[kind].append(label)
        else:
            self.report.unchanged[kind].append(label)
        self.touched[model].add(obj.pk)
        return obj

    def refused_code(self, obj: models.Model, before: dict[str, Any] | None, path: Path, spec: tuple[F, ...]) -> bool:
        """Whether the entry changes what runs as every researcher (a new object: sets it), each such key an error."""
        changed = changed_code(obj, _snapshot(type(obj)()) if before is None else before)
        keys = {f.target: f.key for f in _flat(spec) if f.target}
        for name in changed:
            key = keys.get(name, name)
            self.error(
                (*path, *_group_path(spec, key)),
                f"{key!r} runs as every researcher who launches with it: changing it needs the permission "
                f"{CODE_PERMISSION} (`manage.py catalog import` does not ask)",
            )
        return bool(changed)

    def section(self, key: str) -> Iterator[tuple[Path, Any]]:
        items = self.data.get(key) if isinstance(self.data, dict) else None
        if items is None:
            return
        if not isinstance(items, list):
            self.error((key,), f"must be a list, got {_type_name(items)}")
            return
        for index, item in enumerate(items):
            yield (key, index), item

    # entities
    def run(self) -> None:
        if self.data is None:
            self.error((), "the file is empty; expected a mapping with gpu_types, runtimes, clusters and models")
            return
        if not isinstance(self.data, dict):
            self.error((), f"the file must hold a mapping at the top level, got {_type_name(self.data)}")
            return
        for key in self.data:
            if key not in TOP_LEVEL:
                self.error((key,), f"unknown key {key!r}; expected one of: {', '.join(TOP_LEVEL)}")
        version = self.data.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            self.error(("version",), f"unsupported format version {version!r}; this portal reads version 1")
            return
        for path, item in self.section("gpu_types"):
            attrs, _ = self.read(item, path, GPU_FIELDS, "gpu_types")
            name = attrs.pop("name", None)
            if name is None or self.duplicate(("gpu", name), path, f"GPU type {name!r}"):
                continue
            if self.upsert(GPUType, {"name": name}, attrs, path, GPU_FIELDS, name) is None:
                self.failed.add(("gpu", name))
        for path, item in self.section("runtimes"):
            attrs, _ = self.read(item, path, RUNTIME_FIELDS, "runtimes")
            kind = attrs.pop("kind", None)
            if kind is None or self.duplicate(("rt", kind), path, f"runtime {kind!r}"):
                continue
            if self.upsert(Runtime, {"kind": kind}, attrs, path, RUNTIME_FIELDS, kind) is None:
                self.failed.add(("rt", kind))
        for path, item in self.section("clusters"):
            self.cluster(path, item)
        for path, item in self.section("models"):
            self.model_card(path, item)

    def cluster(self, path: Path, item: Any) -> None:
        attrs, children = self.read(item, path, CLUSTER_FIELDS, "clusters")
        slug = attrs.pop("slug", None)
        if slug is None or self.duplicate(("cluster", slug), path, f"cluster {slug!r}"):
            return
        cluster = self.upsert(Cluster, {"slug": slug}, attrs, path, CLUSTER_FIELDS, slug)
        if cluster is None:
            self.failed.add(("cluster", slug))
        for index, p_item in enumerate(children.get("partitions", [])):
            p_path = (*path, "partitions", index)
            p_attrs, p_children = self.read(p_item, p_path, PARTITION_FIELDS, "partitions")
            name = p_attrs.pop("name", None)
            if name is None or self.duplicate(("partition", slug, name), p_path, f"partition {name!r}"):
                continue
            lookup = {"cluster": cluster, "name": name}
            partition = self.upsert(Partition, lookup, p_attrs, p_path, PARTITION_FIELDS, f"{slug}/{name}")
            for n_index, n_item in enumerate(p_children.get("node_groups", [])):
                self.node_group((*p_path, "node_groups", n_index), n_item, partition, f"{slug}/{name}")
        for index, r_item in enumerate(children.get("runtimes", [])):
            r_path = (*path, "runtimes", index)
            r_attrs, r_refs = self.read(r_item, r_path, CLUSTER_RUNTIME_FIELDS, "runtimes")
            kind = r_refs.get("runtime")
            if kind is None or self.duplicate(("crt", slug, kind), r_path, f"runtime {kind!r} on this cluster"):
                continue
            runtime = Runtime.objects.filter(kind=kind).first()
            if runtime is None:
                if ("rt", kind) not in self.failed:
                    self.error((*r_path, "runtime"), f"unknown runtime {kind!r}; define it under runtimes first")
                continue
            lookup = {"cluster": cluster, "runtime": runtime}
            self.upsert(ClusterRuntime, lookup, r_attrs, r_path, CLUSTER_RUNTIME_FIELDS, f"{kind} on {slug}")

    def node_group(self, path: Path, item: Any, partition: Partition | None, where: str) -> None:
        attrs, refs = self.read(item, path, NODE_GROUP_FIELDS, "node_groups")
        gpu_name = refs.get("gpu_type")
        if gpu_name is None:
            return
        gpu = GPUType.objects.filter(name=gpu_name).first()
        if gpu is None and ("gpu", gpu_name) not in self.failed:
            self.error((*path, "gpu_type"), f"unknown GPU type {gpu_name!r}; define it under gpu_types first")
            return
        per_node = attrs.get("gpus_per_node")
        if self.duplicate(("ng", where, gpu_name, per_node), path, f"node group of {per_node} x {gpu_name}"):
            return
        if per_node is not None:
            lookup = {"partition": partition, "gpu_type": gpu, "gpus_per_node": attrs.pop("gpus_per_node")}
            label = f"{where}: {per_node} x {gpu_name}"
            self.upsert(NodeGroup, lookup, attrs, path, NODE_GROUP_FIELDS, label)

    def model_card(self, path: Path, item: Any) -> None:
        attrs, children = self.read(item, path, MODEL_FIELDS, "models")
        name = attrs.pop("name", None)
        if name is None or self.duplicate(("model", name), path, f"model {name!r}"):
            return
        card = self.upsert(ModelCard, {"name": name}, attrs, path, MODEL_FIELDS, name)
        for index, v_item in enumerate(children.get("variants", [])):
            v_path = (*path, "variants", index)
            v_attrs, v_children = self.read(v_item, v_path, VARIANT_FIELDS, "variants")
            quant = v_attrs.pop("quantization", None)
            if quant is None:
                continue
            with contextlib.suppress(KeyError):  # an unknown name is reported by full_clean() with the known ones
                quant = canonical_quant(quant)
            if self.duplicate(("variant", name, quant), v_path, f"variant {quant!r}"):
                continue
            lookup = {"model": card, "quantization": quant}
            variant = self.upsert(ModelVariant, lookup, v_attrs, v_path, VARIANT_FIELDS, f"{name} {quant}")
            for l_index, l_item in enumerate(v_children.get("locations", [])):
                self.location((*v_path, "locations", l_index), l_item, variant, f"{name} {quant}")

    def location(self, path: Path, item: Any, variant: ModelVariant | None, where: str) -> None:
        attrs, refs = self.read(item, path, LOCATION_FIELDS, "locations")
        slug = refs.get("cluster")
        if slug is None or self.duplicate(("loc", where, slug), path, f"location on cluster {slug!r}"):
            return
        cluster = Cluster.objects.filter(slug=slug).first()
        if cluster is None and ("cluster", slug) not in self.failed:
            self.error((*path, "cluster"), f"unknown cluster {slug!r}; define it under clusters first")
            return
        lookup = {"variant": variant, "cluster": cluster}
        self.upsert(VariantLocation, lookup, attrs, path, LOCATION_FIELDS, f"{where} on {slug}")

    def fill_left(self) -> None:
        for model, kind in ENTITY_LABELS.items():
            rest = model._default_manager.exclude(pk__in=self.touched[model])
            self.report.left[kind] = [str(obj) for obj in rest]


def import_catalog(text: str, filename: str, *, dry_run: bool = False, may_change_code: bool = True) -> ImportReport:
    """Validate and upsert a whole catalog file in one transaction; raise CatalogImportError listing every problem.
    Without `may_change_code`, setting a field that runs as every researcher is one of them."""
    located, syntax_errors = read_yaml(text)
    if located is None or syntax_errors:
        raise CatalogImportError([CatalogError(filename, line, path_text(p), m) for line, p, m in syntax_errors])
    importer = _Importer(located, filename, may_change_code)
    try:
        with transaction.atomic():
            importer.run()
            if importer.errors:
                raise _Rollback
            importer.fill_left()
            if dry_run:
                raise _Rollback
    except _Rollback:
        if importer.errors:
            importer.errors.sort(key=lambda e: e.line)
            raise CatalogImportError(importer.errors) from None
    return importer.report


def import_file(filename: str, *, dry_run: bool = False) -> ImportReport:
    try:
        with open(filename, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise CatalogImportError([CatalogError(filename, 0, "", "no such file")]) from None
    except UnicodeDecodeError as exc:
        raise CatalogImportError([CatalogError(filename, 0, "", f"not UTF-8 text: {exc.reason}")]) from None
    except OSError as exc:
        raise CatalogImportError([CatalogError(filename, 0, "", f"cannot read it: {exc.strerror}")]) from None
    return import_catalog(text, filename, dry_run=dry_run)


# --- Export ---------------------------------------------------------------------------------------------------


def _value_out(f: F, value: Any) -> Any:
    if f.kind == "strlist":
        return [item for item in value.replace(",", " ").split() if item] if value else []
    if f.kind == "float" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _fields_out(obj: models.Model, spec: tuple[F, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in spec:
        if f.kind == "group":
            out[f.key] = _fields_out(obj, f.group)
        elif f.target and f.kind not in ("list", "ref"):
            value = _value_out(f, getattr(obj, f.target))
            if f.required or value not in (None, "", []):
                out[f.key] = value
    return out


def export_catalog() -> str:
    data: dict[str, Any] = {"version": FORMAT_VERSION}
    data["gpu_types"] = [_fields_out(g, GPU_FIELDS) for g in GPUType.objects.order_by("name")]
    data["runtimes"] = [_fields_out(r, RUNTIME_FIELDS) for r in Runtime.objects.order_by("kind")]
    clusters = []
    partitions = Partition.objects.prefetch_related("node_groups__gpu_type").order_by("name")
    installs = ClusterRuntime.objects.select_related("runtime").order_by("runtime__kind")
    for cluster in Cluster.objects.order_by("slug").prefetch_related(
        models.Prefetch("partitions", queryset=partitions), models.Prefetch("runtimes", queryset=installs)
    ):
        entry = _fields_out(cluster, CLUSTER_FIELDS)
        entry["partitions"] = []
        for partition in cluster.partitions.all():
            p = _fields_out(partition, PARTITION_FIELDS)
            p["node_groups"] = []
            for group in sorted(partition.node_groups.all(), key=lambda g: (g.gpu_type.name, g.gpus_per_node)):
                p["node_groups"].append({"gpu_type": group.gpu_type.name, **_fields_out(group, NODE_GROUP_FIELDS)})
            entry["partitions"].append(p)
        entry["runtimes"] = [
            {"runtime": install.runtime.kind, **_fields_out(install, CLUSTER_RUNTIME_FIELDS)}
            for install in cluster.runtimes.all()
        ]
        clusters.append(entry)
    data["clusters"] = clusters
    model_list = []
    locations = VariantLocation.objects.select_related("cluster").order_by("cluster__slug")
    variants = ModelVariant.objects.prefetch_related(models.Prefetch("locations", queryset=locations)).order_by(
        "size_gib", "quantization"
    )
    for card in ModelCard.objects.order_by("name").prefetch_related(models.Prefetch("variants", queryset=variants)):
        entry = _fields_out(card, MODEL_FIELDS)
        entry["variants"] = []
        for variant in card.variants.all():
            v = _fields_out(variant, VARIANT_FIELDS)
            v["locations"] = [
                {"cluster": loc.cluster.slug, **_fields_out(loc, LOCATION_FIELDS)} for loc in variant.locations.all()
            ]
            entry["variants"].append(v)
        model_list.append(entry)
    data["models"] = model_list
    stream = io.StringIO()
    stream.write("# HPC LLM Portal catalog (format version 1). Import with: python manage.py catalog import FILE\n")
    yaml.dump(data, stream, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)
    return stream.getvalue()


class _Dumper(yaml.SafeDumper):
    """Writes multi-line text (host keys, notes) as literal blocks so exported files stay readable."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str_representer)


# --- helpers --------------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        bool: "true/false",
        int: "a whole number",
        float: "a number",
        str: "text",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _convert(f: F, raw: Any) -> tuple[bool, Any]:
    """Return (True, value) or (False, message) for a scalar or string list field."""
    if f.kind == "str":
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            return False, f"must be text, got {_type_name(raw)}"
        return True, raw if isinstance(raw, str) else str(raw)
    if f.kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            return False, f"must be a whole number, got {_type_name(raw)} {raw!r}"
        return True, raw
    if f.kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            return False, f"must be a number, got {_type_name(raw)} {raw!r}"
        return True, float(raw)
    if f.kind == "bool":
        if not isinstance(raw, bool):
            return False, f"must be true or false, got {_type_name(raw)} {raw!r}"
        return True, raw
    if f.kind == "strlist":
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            return False, f"must be a list of text items, got {_type_name(raw)}"
        return True, f.joiner.join(item.strip() for item in raw)
    raise AssertionError(f.kind)


def _model_default(spec: tuple[F, ...], f: F) -> Any:
    assert f.target is not None
    model_field = _SPEC_MODELS[spec]._meta.get_field(f.target)
    assert isinstance(model_field, models.Field)
    return model_field.get_default()


def _group_path(spec: tuple[F, ...], key: str) -> Path:
    for f in spec:
        if f.kind == "group" and any(sub.key == key for sub in f.group):
            return (f.key, key)
    return (key,)


def _snapshot(obj: models.Model) -> dict[str, Any]:
    return {f.attname: getattr(obj, f.attname) for f in obj._meta.concrete_fields}


_SPEC_MODELS: dict[tuple[F, ...], type[models.Model]] = {
    GPU_FIELDS: GPUType,
    RUNTIME_FIELDS: Runtime,
    CLUSTER_FIELDS: Cluster,
    PARTITION_FIELDS: Partition,
    NODE_GROUP_FIELDS: NodeGroup,
    CLUSTER_RUNTIME_FIELDS: ClusterRuntime,
    MODEL_FIELDS: ModelCard,
    ARCH_FIELDS: ModelCard,
    LOCATION_FIELDS: VariantLocation,
    VARIANT_FIELDS: ModelVariant,
}
