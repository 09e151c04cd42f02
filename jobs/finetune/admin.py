"""The admin of fine-tune runs (registered by jobs/admin.py): every run with its history, read-only, with a cancel; and
the training environments, where an admin records what a cluster's PyTorch environment can do (QLoRA's bitsandbytes)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest

from jobs.finetune import actions
from jobs.models import FineTuneEvent, FineTuneRun, FineTuneShare, TrainingRuntime

FILES = ("train_file", "valid_file")  # private storage: the owner's data, never offered as a link


class FineTuneShareInline(admin.TabularInline[FineTuneShare, FineTuneRun]):
    """Whom the owner shared the adapter with; the owner shares and revokes on the run's page."""

    model = FineTuneShare
    extra = 0
    can_delete = False
    fields = readonly_fields = ("user", "group", "created_by", "created_at", "expires_at", "revoked_at")

    def has_add_permission(self, request: HttpRequest, obj: FineTuneRun | None = None) -> bool:
        return False


class FineTuneEventInline(admin.TabularInline[FineTuneEvent, FineTuneRun]):
    model = FineTuneEvent
    extra = 0
    can_delete = False
    readonly_fields = ["at", "from_state", "to_state", "reason"]

    def has_add_permission(self, request: HttpRequest, obj: FineTuneRun | None = None) -> bool:
        return False


@admin.register(FineTuneRun)
class FineTuneRunAdmin(admin.ModelAdmin[FineTuneRun]):
    """Runs change through the poll and a cancel (jobs.models.transition_finetune), never through a form."""

    list_display = ["id", "owner", "variant", "method", "state", "step", "planned_steps", "train_loss", "created_at"]
    list_filter = ["state", "method", "cluster"]
    search_fields = ["id", "owner__username", "name", "job_id"]
    list_select_related = ["owner", "variant__model"]
    inlines = [FineTuneShareInline, FineTuneEventInline]
    actions = ["cancel_runs"]
    exclude = list(FILES)

    def get_readonly_fields(self, request: HttpRequest, obj: FineTuneRun | None = None) -> list[str]:
        return [f.name for f in FineTuneRun._meta.fields if f.name not in FILES]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # runs start with their data from the pages or `manage.py finetune create`

    @admin.action(description="Cancel the selected fine-tune runs (their checkpoints are kept)", permissions=["change"])
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[FineTuneRun]) -> None:
        for run in queryset:
            try:
                actions.cancel(run)
            except ValidationError:
                continue  # already ended
        messages.info(request, "Cancellation requested.")


@admin.register(TrainingRuntime)
class TrainingRuntimeAdmin(admin.ModelAdmin[TrainingRuntime]):
    """What a cluster's transformers runtime (its PyTorch environment) can train with beyond LoRA."""

    list_display = ["runtime", "cuda_bitsandbytes"]
    list_select_related = ["runtime__cluster", "runtime__runtime"]
