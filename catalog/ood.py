"""Open OnDemand cluster definitions (`/etc/ood/config/clusters.d/*.yml`) as catalog clusters.

    read(paths) -> Found                 each file's Slurm cluster, or why it was skipped; bad YAML is an error
    import_clusters(found) -> Imported   through the catalog's YAML import (catalog/yaml_io.py), all or nothing

A file is OnDemand's schema v2: `v2.metadata.title` names the cluster, `v2.login.host` is where the portal logs in,
and a Slurm `v2.job` gives `cluster` (every Slurm command's --clusters) and `bin` (where Slurm's binaries are). The
file name is the cluster's id there, and its slug here. Host keys are never taken from these files: each imported
cluster needs its host key pinned, as for any other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from catalog.yaml_io import CatalogError, CatalogImportError, ImportReport, export_catalog, import_catalog

SOURCE = "ood-import"  # the file name the catalog import sees
# Where each catalog field came from in an OnDemand file, for messages.
ORIGIN = {
    "slug": "the file name",
    "name": "v2.metadata.title",
    "login_host": "v2.login.host",
    "slurm_cluster": "v2.job.cluster",
    "slurm_bin_dir": "v2.job.bin",
}
# OnDemand job keys the portal has no use for, and why the admin should know.
NOT_IMPORTED = {
    "conf": "job.conf (SLURM_CONF) is not imported: the portal's commands read the login host's own slurm.conf",
    "bin_overrides": "job.bin_overrides is not imported: the portal calls Slurm's own binaries (job.bin)",
    "submit_host": "job.submit_host is not imported: the portal runs Slurm's commands on login.host",
}


class OodError(ValueError):
    """A file that is not an OnDemand cluster definition the portal can read; nothing is imported."""


@dataclass(frozen=True)
class OodCluster:
    source: str  # the file
    slug: str
    name: str
    login_host: str
    slurm_cluster: str = ""
    slurm_bin_dir: str = ""
    notes: tuple[str, ...] = ()  # what the file says that the portal leaves out


@dataclass
class Found:
    clusters: list[OodCluster] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "FILE: why"


def slug_of(path: Path) -> str:
    """OnDemand's cluster id is the file name without .yml; the catalog's slugs are lower case."""
    slug = re.sub(r"[^a-z0-9_.-]+", "-", path.name.removesuffix(".yml").removesuffix(".yaml").lower())
    return slug.lstrip("_.-")[:50] or "cluster"


def _text(value: Any, where: str, source: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise OodError(f"{source}: {where} must be text, got {type(value).__name__}")
    return str(value).strip()


def parse(text: str, source: str) -> OodCluster | str:
    """One file: its cluster, or the reason it is skipped (text). Raises OodError when it cannot be read at all."""
    if "<%" in text:
        raise OodError(f"{source}: an ERB template (<% ... %>); render it first, the portal does not evaluate ERB")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Where the broken construct starts (an unclosed quote) says more than where the parser gave up.
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise OodError(f"{source}{line}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise OodError(f"{source}: expected a mapping with a v2 key, got {type(data).__name__}")
    if "v2" not in data:
        return "not OnDemand's schema v2 (no v2 key)"
    v2 = data["v2"]
    if not isinstance(v2, dict):
        raise OodError(f"{source}: v2 must be a mapping")
    sections = {key: v2.get(key) or {} for key in ("metadata", "login", "job")}
    for key, value in sections.items():
        if not isinstance(value, dict):
            raise OodError(f"{source}: v2.{key} must be a mapping")
    job = sections["job"]
    adapter = _text(job.get("adapter"), "v2.job.adapter", source)
    if adapter != "slurm":
        return f"its job adapter is {adapter or 'not set'}, not slurm"
    login_host = _text(sections["login"].get("host"), "v2.login.host", source)
    if not login_host:
        return "no login host (v2.login.host): nowhere for the portal to log in"
    slug = slug_of(Path(source))
    bin_dir = _text(job.get("bin"), "v2.job.bin", source)
    notes = tuple(why for key, why in NOT_IMPORTED.items() if job.get(key))
    if sections["metadata"].get("hidden"):
        notes += ("hidden in OnDemand (metadata.hidden); imported all the same",)
    return OodCluster(
        source=source,
        slug=slug,
        name=_text(sections["metadata"].get("title"), "v2.metadata.title", source) or slug,
        login_host=login_host,
        slurm_cluster=_text(job.get("cluster"), "v2.job.cluster", source),
        slurm_bin_dir=bin_dir.rstrip("/") or bin_dir,
        notes=notes,
    )


def files_in(paths: list[str]) -> list[Path]:
    """The files named, and the *.yml files of the directories named (as OnDemand reads clusters.d)."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".yml", ".yaml"))
        elif path.is_file():
            found.append(path)
        else:
            raise OodError(f"{name}: no such file or directory")
    return found


def read(paths: list[str]) -> Found:
    """Every cluster definition in the files and directories; raises OodError (every problem, one per line) when
    any file cannot be read, so that nothing is imported from a half-read directory."""
    found = Found()
    errors = []
    for path in files_in(paths):
        try:
            parsed = parse(path.read_text(encoding="utf-8"), str(path))
        except (OodError, OSError, UnicodeDecodeError) as exc:
            errors.append(str(exc) if isinstance(exc, OodError) else f"{path}: cannot read it: {exc}")
            continue
        if isinstance(parsed, str):
            found.skipped.append(f"{path}: {parsed}")
        else:
            found.clusters.append(parsed)
    if errors:
        raise OodError("\n".join(errors))
    return found


@dataclass(frozen=True)
class Imported:
    report: ImportReport
    need_host_key: list[str]  # slugs of the imported clusters that have no pinned host key
    cleared: list[str]  # slugs whose login host changed, so their old pinned key was dropped


def document(found: Found, exported: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The catalog YAML for the found clusters: an existing cluster's entry as exported (host key, partitions and
    limits kept) with OnDemand's values over it; a login host that changed drops the key pinned for the old one."""
    existing = {c["slug"]: c for c in exported.get("clusters") or []}
    entries, cleared = [], []
    for cluster in found.clusters:
        entry = dict(existing.get(cluster.slug, {}))
        if entry and entry.get("login_host") != cluster.login_host and entry.get("host_key"):
            entry["host_key"] = ""
            cleared.append(cluster.slug)
        entry.update(
            slug=cluster.slug,
            name=cluster.name,
            login_host=cluster.login_host,
            slurm_cluster=cluster.slurm_cluster,
            slurm_bin_dir=cluster.slurm_bin_dir,
        )
        entries.append(entry)
    return {"version": 1, "clusters": entries}, cleared


def import_clusters(found: Found, *, dry_run: bool = False) -> Imported:
    """Create or update the clusters through the catalog's YAML import, all or nothing. A CatalogImportError's
    messages name the OnDemand file and key each problem came from."""
    data, cleared = document(found, yaml.safe_load(export_catalog()) or {})
    try:
        report = import_catalog(yaml.safe_dump(data, sort_keys=False), SOURCE, dry_run=dry_run)
    except CatalogImportError as exc:
        raise CatalogImportError([_located(error, found) for error in exc.errors]) from None
    slugs = [c.slug for c in found.clusters]
    pinned = {c["slug"] for c in data["clusters"] if str(c.get("host_key") or "").strip()}
    return Imported(report, [s for s in slugs if s not in pinned], cleared)


def _located(error: CatalogError, found: Found) -> CatalogError:
    """An import error about the generated YAML, told as the OnDemand file and key it came from."""
    match = re.match(r"clusters\[(\d+)\](?:\.(\w+))?", error.path)
    if match is None or int(match.group(1)) >= len(found.clusters):
        return error
    cluster = found.clusters[int(match.group(1))]
    key = match.group(2) or ""
    origin = ORIGIN.get(key, key)
    return CatalogError(cluster.source, 0, origin, error.message)
