from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from jobs.models import LLMSession, SessionEvent
from jobs.sessions.actions import request_cancel


class SessionEventInline(admin.TabularInline[SessionEvent, LLMSession]):
    model = SessionEvent
    extra = 0
    can_delete = False
    readonly_fields = ["at", "from_state", "to_state", "cause"]

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
    inlines = [SessionEventInline]
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
