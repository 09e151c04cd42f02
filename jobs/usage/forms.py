"""What the usage pages, the CSV and `manage.py usage` take: a period (the last N months, or from a day or month to a
day), and for the site's table what it is grouped and sorted by."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from django import forms
from django.utils import timezone

from jobs.usage.figures import BY, Period
from jobs.usage.tables import KEY, SORTS, default_sort, key_label

DEFAULT_MONTHS = 12
MAX_MONTHS = 120


class PeriodForm(forms.Form):
    months = forms.IntegerField(
        required=False, min_value=1, max_value=MAX_MONTHS, help_text="This month and the ones before it."
    )
    since = forms.DateField(
        required=False, input_formats=["%Y-%m-%d", "%Y-%m"], help_text="A day (YYYY-MM-DD) or a month (YYYY-MM)."
    )
    until = forms.DateField(required=False, input_formats=["%Y-%m-%d"], help_text="The last day, included.")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        if since and until and until < since:
            raise forms.ValidationError("The last day comes before the first.")
        if until and not since:
            raise forms.ValidationError("Give the first day too.")
        if since and since > timezone.localdate():
            raise forms.ValidationError("The first day has not come yet.")
        return data

    def period(self, now: datetime | None = None) -> Period:
        """The period asked for: from a first day when one is given (the months menu, which always sends a value, is
        then ignored), else the last N months; the last DEFAULT_MONTHS months when nothing (or something wrong) is."""
        now = now or timezone.now()
        data = self.cleaned_data if self.is_valid() else {}
        since: date | None = data.get("since")
        if since:
            return Period.between(since, data.get("until") or timezone.localdate(now), now)
        return Period.months(data.get("months") or DEFAULT_MONTHS, now)

    def months_shown(self) -> int | None:
        """The months the period's menu shows as chosen; None for a period from a first day."""
        data = self.cleaned_data if self.is_valid() else {}
        return None if data.get("since") else data.get("months") or DEFAULT_MONTHS


class SiteForm(PeriodForm):
    by = forms.ChoiceField(choices=[(name, key_label(name)) for name in BY], required=False, label="Group by")
    sort = forms.ChoiceField(choices=[(name, name) for name in SORTS], required=False)
    dir = forms.ChoiceField(choices=[("asc", "ascending"), ("desc", "descending")], required=False)

    def grouping(self) -> tuple[str, str, bool]:
        """(by, sort, descending); a site's table is by user unless asked, sorted as default_sort says. A wrong period
        leaves the grouping asked for as it is (cleaned_data keeps the fields that were right)."""
        self.is_valid()
        data = self.cleaned_data
        by = data.get("by") or "user"
        sort, descending = default_sort(by)
        if data.get("sort"):
            sort, descending = data["sort"], data["sort"] != KEY
        if data.get("dir"):
            descending = data["dir"] == "desc"
        return by, sort, descending
