from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from jobs.models import GroupSource, LLMSession, ProxyRequest, SessionEvent, SessionShare
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

    @admin.action(description="Cancel the selected sessions")
    def cancel_sessions(self, request: HttpRequest, queryset: QuerySet[LLMSession]) -> None:
        for session in queryset:
            if not session.is_ended:
                request_cancel(session, f"cancelled by admin {request.user}")
        messages.info(request, "Cancellation requested.")


@admin.register(GroupSource)
class GroupSourceAdmin(admin.ModelAdmin[GroupSource]):
    """Groups that follow the cluster's Unix/LDAP groups or Slurm accounts (jobs/sessions/groups.py)."""

    list_display = ["group", "kind", "name", "account", "synced_at", "members_found", "last_error"]
    list_filter = ["kind", "account__cluster"]
    readonly_fields = ["synced_at", "members_found", "last_error"]
    actions = ["sync_now"]

    @admin.action(description="Read the selected sources' groups from their clusters now")
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
