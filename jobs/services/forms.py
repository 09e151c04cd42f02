"""The services' own fields on the pages, taken from ModelService's columns (limits, labels, help): ServiceForm, a new
service's name, replicas and audience (its launch is LaunchForm's, beside it), and ScaleForm, what scale() changes.
Neither saves: the views hand the cleaned values to actions.create() and actions.scale(), which check them again."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from django import forms
from django.contrib.auth.models import Group, User
from django.core.exceptions import ValidationError

from jobs.models import RUN_SITE_SERVICE, ModelService
from jobs.sessions.forms import LaunchForm

REPLICAS = ["min_replicas", "max_replicas", "target_inflight", "idle_minutes"]
SCALED = [*REPLICAS, "max_inflight_per_user"]  # what scale() changes


class ScaleForm(forms.ModelForm[ModelService]):
    class Meta:
        model = ModelService
        fields = SCALED
        labels = {"min_replicas": "Min replicas", "max_replicas": "Max replicas",
                  "target_inflight": "Target in flight", "idle_minutes": "Idle minutes",
                  "max_inflight_per_user": "Max in flight per user"}  # fmt: skip


class ServiceForm(forms.ModelForm[ModelService]):
    """A new service. Its audience offers "everyone signed in" only to those with the permission, and its groups are
    the user's own (any group for a superuser)."""

    class Meta:
        model = ModelService
        fields = ["name", *SCALED, "audience", "groups"]
        labels = ScaleForm.Meta.labels
        widgets = {"audience": forms.RadioSelect, "groups": forms.CheckboxSelectMultiple}

    def __init__(self, *args: Any, user: User, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user
        audience = self.fields["audience"]
        assert isinstance(audience, forms.ChoiceField)
        if not may_run_site_service(user):
            audience.choices = [c for c in ModelService.Audience.choices if c[0] != ModelService.Audience.SITE]
        groups = self.fields["groups"]
        assert isinstance(groups, forms.ModelMultipleChoiceField)
        groups.queryset = Group.objects.all() if user.is_superuser else user.groups.all()
        groups.help_text = "Members of these groups may use it (when its audience is its groups)."

    def create_args(self) -> dict[str, Any]:
        """The cleaned values as actions.create() takes them."""
        data = self.cleaned_data
        return {"min_replicas": data["min_replicas"], "max_replicas": data["max_replicas"],
                "audience": data["audience"], "groups": list(data["groups"]),
                "target_inflight": data["target_inflight"], "idle_minutes": data["idle_minutes"],
                "max_inflight_per_user": data["max_inflight_per_user"]}  # fmt: skip


def may_run_site_service(user: User) -> bool:
    return user.has_perm(".".join(reversed(RUN_SITE_SERVICE)))


def launch_values(data: Mapping[str, Any]) -> dict[str, Any]:
    """The launch's fields of a request (LaunchForm's names only), as actions.create() takes a launch."""
    return {name: data[name] for name in LaunchForm.base_fields if data.get(name) not in (None, "")}


def add_errors(forms_: Sequence[forms.BaseForm], error: ValidationError) -> None:
    """A ValidationError from an action, on the form that has each field (the first form's top otherwise)."""
    if not hasattr(error, "error_dict"):
        forms_[0].add_error(None, error)
        return
    for name, errors in error.error_dict.items():
        form = next((f for f in forms_ if name in f.fields), None)
        if form is None:
            forms_[0].add_error(None, [f"{name}: {m}" for e in errors for m in e.messages])
        else:
            form.add_error(name, errors)
