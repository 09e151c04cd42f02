"""`manage.py usage [--user NAME] [--by ...] [--since YYYY-MM] [--until YYYY-MM-DD] [--csv]`: the usage tables of the
pages, from the command line (docs/usage.md).

Without --user, the whole site's usage (Site usage), by user unless --by says otherwise; with it, that user's (My
usage: the requests they made, their sessions' GPU-hours, their batch runs), by month unless --by says otherwise. The
columns, the CSV and its escaping are the pages' own (jobs/usage/tables.py).
"""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from jobs.usage import figures, tables
from jobs.usage.forms import PeriodForm
from portal.errors import text_of
from portal.users import find_user


class Command(BaseCommand):
    help = "Usage: the site's or one user's requests, tokens, percentiles and GPU-hours, as a table or CSV."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--user", help="one user's usage (default: the whole site's)")
        parser.add_argument("--by", choices=figures.BY, help="rows by (default: user, or month with --user)")
        parser.add_argument("--since", help="first day (YYYY-MM-DD) or month (YYYY-MM); default: the last 12 months")
        parser.add_argument("--until", help="last day, included (YYYY-MM-DD); default: today")
        parser.add_argument("--months", type=int, help="this month and the ones before it, instead of --since")
        parser.add_argument("--csv", action="store_true", help="CSV, as the Site usage page downloads it")

    def handle(self, *args: Any, **options: Any) -> None:
        asked = {name: options[name] for name in ("since", "until", "months") if options[name] is not None}
        form = PeriodForm(asked)
        if not form.is_valid():
            raise CommandError(text_of(ValidationError(form.errors.as_data())))
        user = None
        if options["user"]:
            try:
                user = find_user(options["user"])
            except ValidationError as exc:
                raise CommandError(text_of(exc)) from None
        by = options["by"] or ("month" if user else "user")
        period = form.period()
        rows = figures.table(figures.Scope(period, user_id=user.pk if user else None), by)
        rows = tables.sort_rows(rows, *tables.default_sort(by))
        total = figures.table_total(by, rows)
        if options["csv"]:
            tables.write_csv(self.stdout, by, rows, total)
            return
        whose = f"{user.get_username()}'s usage" if user else "Site usage"
        self.stdout.write(f"{whose} by {tables.key_label(by).lower()}, {period.first_day} to {period.last_day}")
        for line in tables.text_table(by, rows, total):
            self.stdout.write(line)
        if total is None:
            self.stdout.write("A user in two groups counts in both (and one in none under '(no group)'): no total.")
