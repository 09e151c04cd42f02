from __future__ import annotations

import sys
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from catalog.yaml_io import CatalogImportError, export_catalog, import_file


class Command(BaseCommand):
    help = "Import or export the catalog (clusters, GPU types, runtimes, models) as YAML."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        imp = sub.add_parser("import", help="Create or update catalog entries from a YAML file, all or nothing.")
        imp.add_argument("file")
        imp.add_argument("--dry-run", action="store_true", help="Check and report, then roll everything back.")
        exp = sub.add_parser("export", help="Write the whole catalog as YAML (to stdout without FILE).")
        exp.add_argument("file", nargs="?")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] == "import":
            self._import(options["file"], options["dry_run"])
        else:
            self._export(options["file"])

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
