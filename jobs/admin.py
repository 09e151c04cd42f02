"""The jobs app's admin pages: sessions with their shares and history, batch runs with their history, group sources,
the request records, scrape tokens. Every action acts, so each needs the model's change permission: Django offers it
to no one else and refuses it, posted anyway, from staff who may only view."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from catalog.models import ClusterAccount
from jobs.batch.actions import stop_run
from jobs.models import (
    LIVE_STATES,
    Allocation,
    BatchEvent,
    BatchRun,
    GroupSource,
    LLMSession,
    ModelService,
    ProxyRequest,
    ScrapeToken,
    SessionEvent,
    SessionShare,
)
from jobs.sessions import groups
from jobs.sessions.actions import request_cancel


class SessionEventInline(admin.TabularInline[SessionEvent, LLMSession]):
    model = SessionEvent
    extra = 0
    can_delete = False
    readonly_fields = ["at", "from_state", "to_state", "cause"]

    def has_add_permission(self, request: HttpRequest, obj: LLMSession | None = None) -> bool:
        return False


class SessionShareInline(admin.TabularInline[SessionShare, LLMSession]):
    """Who the owner shared it with; the owner shares and revokes on the session's page."""

    model = SessionShare
    fk_name = "session"
    extra = 0
    can_delete = False
    fields = readonly_fields = ("user", "group", "chat", "api", "created_at", "expires_at", "revoked_at")

    def has_add_permission(self, request: HttpRequest, obj: LLMSession | None = None) -> bool:
        return False


@admin.register(LLMSession)
class SessionAdmin(admin.ModelAdmin[LLMSession]):
    list_display = [
        "id",
        "owner",
        "state",
        "cluster",
        "partition",
        "gpu_type",
        "variant",
        "runtime",
        "job_id",
        "created_at",
    ]
    list_filter = ["state", "cluster", "runtime"]
    search_fields = ["id", "owner__username", "job_id", "node_list"]
    inlines = [SessionShareInline, SessionEventInline]
    actions = ["cancel_sessions"]
    readonly_fields = [f.name for f in LLMSession._meta.fields if f.name != "api_key_encrypted"]
    exclude = ["api_key_encrypted"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # sessions start through the wizard or `manage.py sessions launch`, which validate and submit

    @admin.action(description="Cancel the selected sessions", permissions=["change"])
    def cancel_sessions(self, request: HttpRequest, queryset: QuerySet[LLMSession]) -> None:
        for session in queryset:
            if not session.is_ended:
                request_cancel(session, f"cancelled by admin {request.user}")
        messages.info(request, "Cancellation requested.")


class BatchEventInline(admin.TabularInline[BatchEvent, BatchRun]):
    model = BatchEvent
    extra = 0
    can_delete = False
    readonly_fields = ["at", "from_state", "to_state", "reason"]

    def has_add_permission(self, request: HttpRequest, obj: BatchRun | None = None) -> bool:
        return False


@admin.register(Allocation)
class AllocationAdmin(admin.ModelAdmin[Allocation]):
    """Set here or with `manage.py allocations set`; what each has spent is on Site usage and in /metrics."""

    list_display = ["holder_label", "cluster", "gpu_hours", "tokens", "period", "starts_on", "ends_on", "action"]
    list_filter = ["period", "action", "cluster"]
    search_fields = ["user__username", "group__name", "slurm_account"]
    filter_horizontal = ["managers"]
    readonly_fields = ["soft_mailed_for", "spent_mailed_for", "created_at", "updated_at"]


@admin.register(ModelService)
class ModelServiceAdmin(admin.ModelAdmin[ModelService]):
    """Services are created, scaled and stopped through jobs/services/actions.py (manage.py services), which check
    the launch and who may use them; here they are read, and their groups and replica counts changed."""

    list_display = ["name", "owner", "audience", "min_replicas", "max_replicas", "live_replicas", "stopped_at"]
    list_filter = ["audience"]
    search_fields = ["name", "owner__username"]
    readonly_fields = ["name", "owner", "launch", "audience", "created_at", "stopped_at"]
    filter_horizontal = ["groups"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="live replicas")
    def live_replicas(self, service: ModelService) -> int:
        return service.replicas.filter(state__in=LIVE_STATES).count()


@admin.register(BatchRun)
class BatchRunAdmin(admin.ModelAdmin[BatchRun]):
    """Batch runs with their history, read-only: a run's state changes through the poll and its stop
    (jobs.models.transition_run), never through a form."""

    list_display = ["id", "owner", "name", "state", "session", "prompts", "done", "failed", "created_at"]
    list_filter = ["state", "ends_session"]
    search_fields = ["id", "owner__username", "name", "session__id"]
    list_select_related = ["owner", "session"]
    inlines = [BatchEventInline]
    actions = ["stop_runs"]
    exclude = ["requests"]  # private storage: the checked prompts are the owner's, downloaded from the run's page

    def get_readonly_fields(self, request: HttpRequest, obj: BatchRun | None = None) -> list[str]:
        return [f.name for f in BatchRun._meta.fields if f.name != "requests"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # runs start from a prompts file through the pages, `manage.py batch` or the Batch API

    @admin.action(description="Stop the selected batch runs (what they answered is kept)", permissions=["change"])
    def stop_runs(self, request: HttpRequest, queryset: QuerySet[BatchRun]) -> None:
        for run in queryset.select_related("session"):
            stop_run(run)
        messages.info(request, "Stop requested.")


@admin.register(GroupSource)
class GroupSourceAdmin(admin.ModelAdmin[GroupSource]):
    """Groups that follow the cluster's Unix/LDAP groups or Slurm accounts (jobs/sessions/groups.py)."""

    list_display = ["group", "kind", "name", "account", "synced_at", "members_found", "last_error"]
    list_filter = ["kind", "account__cluster"]
    readonly_fields = ["synced_at", "members_found", "last_error"]
    actions = ["sync_now"]

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        """Only accounts that may read for the whole site are offered (GroupSource.clean refuses the others)."""
        if db_field.name == "account":
            kwargs["queryset"] = ClusterAccount.objects.filter(ClusterAccount.reads_for_site_q()).select_related(
                "cluster", "user"
            )
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    @admin.action(description="Read the selected sources' groups from their clusters now", permissions=["change"])
    def sync_now(self, request: HttpRequest, queryset: QuerySet[GroupSource]) -> None:
        for group in {source.group for source in queryset.select_related("group")}:
            result = groups.sync(group)
            text = f"{result.group}: {len(result.added)} added, {len(result.removed)} removed"
            if result.errors:
                messages.error(request, f"{text}; " + "; ".join(result.errors))
            else:
                messages.info(request, text)


@admin.register(ProxyRequest)
class ProxyRequestAdmin(admin.ModelAdmin[ProxyRequest]):
    """The record of each request through the proxy (read-only: what the usage pages add up)."""

    list_display = ["at", "user", "session", "route", "endpoint", "status", "prompt_tokens", "completion_tokens",
                    "ttft_ms", "tokens_per_s"]  # fmt: skip
    list_filter = ["route", "endpoint", "status", "tokens_reported"]
    search_fields = ["user__username"]
    date_hierarchy = "at"
    list_select_related = ["user"]

    def get_readonly_fields(self, request: HttpRequest, obj: ProxyRequest | None = None) -> list[str]:
        return [f.name for f in ProxyRequest._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ProxyRequest | None = None) -> bool:
        return False


@admin.register(ScrapeToken)
class ScrapeTokenAdmin(admin.ModelAdmin[ScrapeToken]):
    """Prometheus's tokens for /metrics (also `manage.py scrapetoken`). Adding one issues it: the token is on the page
    that answers the form, once, and only its SHA-256 is kept. Revoking keeps the row, to show when it was last used."""

    list_display = ["name", "hint", "in_force", "created_at", "last_used_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    readonly_fields = ["hint", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    def get_fields(self, request: HttpRequest, obj: ScrapeToken | None = None) -> tuple[str, ...]:
        return ("name", *self.readonly_fields) if obj else ("name",)

    @admin.display(boolean=True, description="in force")
    def in_force(self, token: ScrapeToken) -> bool:
        return token.revoked_at is None

    @sensitive_variables("token")
    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, object] | None = None
    ) -> HttpResponse:
        """The admin's own add form asks for the name; a valid POST issues the token through ScrapeToken.issue (as
        the command does) and answers with it, rather than redirecting: the plain token is never stored, not even in
        a message cookie."""
        if request.method == "POST" and self.has_add_permission(request):
            form = self.get_form(request)(request.POST)
            if form.is_valid():
                row, token = ScrapeToken.issue(form.cleaned_data["name"])
                self.log_addition(request, row, [{"added": {}}])
                context = {**self.admin_site.each_context(request), "opts": self.opts, "row": row, "token": token,
                           "title": "Scrape token issued"}  # fmt: skip
                return TemplateResponse(request, "admin/jobs/scrapetoken/issued.html", context)
        return super().add_view(request, form_url, extra_context)  # the form, its errors, or 403

    @admin.action(description="Revoke the selected scrape tokens", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ScrapeToken]) -> None:
        revoked = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        messages.info(request, f"Revoked {revoked} scrape token{'s' if revoked != 1 else ''}.")


# Fine-tune runs and training environments register themselves beside their concern.
from jobs.finetune import admin as finetune_admin  # noqa: E402, F401
