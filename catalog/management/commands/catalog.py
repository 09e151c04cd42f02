from __future__ import annotations

import sys
from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from catalog import discover, ood
from catalog.add_model import add, add_all, cluster_reader, inspect
from catalog.inventory import DiscoverError as InventoryError
from catalog.models import Cluster
from catalog.scan import report as scan_report
from catalog.scan import scan
from catalog.yaml_io import CatalogImportError, export_catalog, import_file
from portal.errors import text_of
from portal.ssh import SSHError
from portal.users import find_user


class Command(BaseCommand):
    help = "Import or export the catalog (clusters, GPU types, runtimes, models) as YAML."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        imp = sub.add_parser("import", help="Create or update catalog entries from a YAML file, all or nothing.")
        imp.add_argument("file")
        imp.add_argument("--dry-run", action="store_true", help="Check and report, then roll everything back.")
        exp = sub.add_parser("export", help="Write the whole catalog as YAML (to stdout without FILE).")
        exp.add_argument("file", nargs="?")
        add = sub.add_parser("add-model", help="Create a model card and variant from a GGUF file or an HF directory.")
        add.add_argument("path", help="absolute path of a .gguf file or a directory with config.json")
        add.add_argument("--cluster", help="read the path on this cluster over SSH and record it as the location")
        add.add_argument("--user", help="with --cluster: the portal user whose cluster account reads it")
        add.add_argument("--name", help="the model card's name (default: from the file)")
        add.add_argument("--dry-run", action="store_true", help="show what was read, change nothing")
        disc = sub.add_parser(
            "discover", help="Read partitions, node groups and GPU types from the cluster's Slurm; show the changes."
        )
        disc.add_argument("cluster", help="the cluster's slug")
        disc.add_argument("--user", required=True, help="the portal user whose cluster account runs scontrol")
        how = disc.add_mutually_exclusive_group()
        how.add_argument("--yes", action="store_true", help="apply the changes (new GPU types need their memory)")
        how.add_argument("--dry-run", action="store_true", help="show the changes, change nothing (the default)")
        disc.add_argument("--yaml", metavar="FILE", help="write the YAML the import would take, to review or edit")
        oodi = sub.add_parser(
            "ood-import", help="Create or update clusters from Open OnDemand's clusters.d files, all or nothing."
        )
        oodi.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="cluster .yml files or clusters.d folders")
        oodi.add_argument("--dry-run", action="store_true", help="Check and report, then roll everything back.")
        scn = sub.add_parser(
            "scan", help="Find GGUF files, Hugging Face directories and ollama stores on a cluster; add them as models."
        )
        scn.add_argument("cluster", help="the cluster's slug")
        scn.add_argument("paths", nargs="+", metavar="PATH", help="absolute paths of directories (or files) to scan")
        scn.add_argument("--user", required=True, help="the portal user whose cluster account reads the files")
        scn.add_argument("--dry-run", action="store_true", help="show what would be added or updated, change nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] == "import":
            self._import(options["file"], options["dry_run"])
        elif options["action"] == "add-model":
            self._add_model(options)
        elif options["action"] == "discover":
            self._discover(options)
        elif options["action"] == "scan":
            self._scan(options)
        elif options["action"] == "ood-import":
            self._ood_import(options["paths"], options["dry_run"])
        else:
            self._export(options["file"])

    def _discover(self, o: dict[str, Any]) -> None:
        cluster = Cluster.objects.filter(slug=o["cluster"]).first()
        if cluster is None:
            raise CommandError(f"there is no cluster {o['cluster']!r}")
        try:
            account = discover.account_for(find_user(o["user"]), cluster)
            found = discover.plan(cluster, discover.read_slurm(account))
        except ValidationError as exc:
            raise CommandError(text_of(exc)) from None
        except (SSHError, InventoryError) as exc:
            raise CommandError(f"{cluster.name}: {exc}") from None
        for line in found.found.skipped:
            self.stdout.write(f"  skipped  {line}")
        for change in found.changes:
            self.stdout.write(str(change))
        if not found.changes:
            self.stdout.write(self.style.SUCCESS(f"{cluster.name}: the catalog matches what Slurm says."))
        for gpu in found.found.unknown_gpus:
            self.stdout.write(self.style.WARNING(
                f"GPU type {gpu.name} is not one the portal knows: give its memory_gib in the YAML (--yaml) and import "
                "that file, or add it in the admin, then discover again."))  # fmt: skip
        if o["yaml"]:
            with open(o["yaml"], "w", encoding="utf-8") as out:
                out.write(found.text)
            self.stdout.write(f"wrote {o['yaml']}")
        if not o["yes"]:
            if found.changes:
                self.stdout.write(
                    "Nothing was changed; run again with --yes to apply (gone entries are only reported)."
                )
            return
        try:
            report = discover.apply(found, account)
        except CatalogImportError as exc:
            raise CommandError("\n".join(str(e) for e in exc.errors) + "\nNothing was changed.") from None
        for line in report.lines():
            self.stdout.write(line)

    def _ood_import(self, paths: list[str], dry_run: bool) -> None:
        try:
            found = ood.read(paths)
            for line in found.skipped:
                self.stdout.write(f"  skipped  {line}")
            if not found.clusters:
                raise CommandError("no Slurm cluster with a login host in these files; nothing was changed.")
            imported = ood.import_clusters(found, dry_run=dry_run)
        except ood.OodError as exc:
            raise CommandError(f"{exc}\nNothing was changed.") from None
        except CatalogImportError as exc:
            errors = "\n".join(f"{e.file}: {e.path + ': ' if e.path else ''}{e.message}" for e in exc.errors)
            raise CommandError(f"{errors}\nNothing was changed.") from None
        report = imported.report
        for kind, names in (("created", report.created), ("updated", report.updated), ("unchanged", report.unchanged)):
            for name in names.get("clusters", []):
                self.stdout.write(f"{kind:>9}  cluster {name}")
        for cluster in found.clusters:
            for note in cluster.notes:
                self.stdout.write(f"     note  {cluster.source}: {note}")
        for slug in imported.cleared:
            self.stdout.write(self.style.WARNING(f"{slug}: its login host changed; its old host key was dropped."))
        if imported.need_host_key:
            self.stdout.write(self.style.WARNING(
                f"Pin the host key of {', '.join(imported.need_host_key)} before use (admin: the cluster's host key): "
                "none is taken from OnDemand's files. Check its fingerprint with the site, as for any cluster."
            ))  # fmt: skip
        if dry_run:
            self.stdout.write(self.style.WARNING("Dry run: the catalog was not changed."))

    def _add_model(self, o: dict[str, Any]) -> None:
        cluster = None
        try:
            if o["cluster"]:
                cluster = Cluster.objects.filter(slug=o["cluster"]).first()
                if cluster is None:
                    raise CommandError(f"there is no cluster {o['cluster']!r}")
                if not o["user"]:
                    raise CommandError("--cluster needs --user: whose cluster account reads the file")
            found = inspect(o["path"], cluster_reader(find_user(o["user"]), cluster) if cluster else None)
            self.stdout.write(f"read {found.source}")
            for key, value in {**vars(found), **vars(found.arch)}.items():
                if key not in ("source", "arch"):
                    self.stdout.write(f"  {key}: {value}")
            if o["dry_run"]:
                self.stdout.write(self.style.WARNING("Dry run: the catalog was not changed."))
                return
            added = add(found, o["path"], cluster, o["name"])
        except ValidationError as exc:
            raise CommandError(text_of(exc)) from None
        except SSHError as exc:
            raise CommandError(str(exc)) from None
        what = ", ".join(added.created) or "nothing new (updated)"
        self.stdout.write(self.style.SUCCESS(f"{added.card.name} {added.variant.quantization}: {what}"))

    def _scan(self, o: dict[str, Any]) -> None:
        cluster = Cluster.objects.filter(slug=o["cluster"]).first()
        if cluster is None:
            raise CommandError(f"there is no cluster {o['cluster']!r}")
        try:
            found = scan(o["paths"], cluster_reader(find_user(o["user"]), cluster))
            outcomes = add_all(found.models, cluster, dry_run=o["dry_run"])
        except ValidationError as exc:
            raise CommandError(text_of(exc)) from None
        except SSHError as exc:
            raise CommandError(f"{cluster.name}: {exc}") from None
        lines, summary = scan_report(found, outcomes)
        for line in lines:
            self.stdout.write(str(line))
        if o["dry_run"]:
            self.stdout.write(self.style.WARNING(f"Dry run ({summary}): the catalog was not changed."))
        else:
            self.stdout.write(self.style.SUCCESS(f"{cluster.name}: {summary}."))

    def _import(self, filename: str, dry_run: bool) -> None:
        try:
            report = import_file(filename, dry_run=dry_run)
        except CatalogImportError as exc:
            for error in exc.errors:
                self.stderr.write(str(error))
            count = len(exc.errors)
            raise CommandError(f"{filename}: {count} error{'s' if count != 1 else ''}; nothing was changed.") from None
        for line in report.lines():
            self.stdout.write(line)
        if dry_run:
            self.stdout.write(self.style.WARNING("Dry run: the catalog was not changed."))
        elif report.changed:
            self.stdout.write(self.style.SUCCESS(f"Imported {filename}."))
        else:
            self.stdout.write(self.style.SUCCESS(f"{filename}: the catalog already matches; nothing changed."))

    def _export(self, filename: str | None) -> None:
        text = export_catalog()
        if not filename or filename == "-":
            sys.stdout.write(text)
            return
        try:
            with open(filename, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            raise CommandError(f"cannot write {filename}: {exc.strerror}") from None
        self.stdout.write(self.style.SUCCESS(f"Wrote {filename}."))
