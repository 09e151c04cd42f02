from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from jobs.models import ClusterAccount, Session, SessionEvent
from jobs.services import request_cancel


class ClusterAccountForm(forms.ModelForm):
    private_key = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4}),
        required=False,
        strip=False,
        help_text="Service accounts: paste the account's unencrypted private key (stored encrypted). Leave empty "
        "to keep the current key, or, for a new account, to have the portal generate a key pair.",
    )

    class Meta:
        model = ClusterAccount
        fields = ["cluster", "kind", "user", "label", "members", "username", "slurm_account"]

    def save(self, commit: bool = True) -> ClusterAccount:
        account: ClusterAccount = super().save(commit=False)
        if self.cleaned_data.get("private_key", "").strip():
            account.set_private_key(self.cleaned_data["private_key"].strip() + "\n")
        if commit:
            account.save()
            self.save_m2m()
        return account


@admin.register(ClusterAccount)
class ClusterAccountAdmin(admin.ModelAdmin):
    form = ClusterAccountForm
    list_display = ["username", "cluster", "kind", "user", "label", "slurm_account"]
    list_filter = ["cluster", "kind"]
    search_fields = ["username", "user__username", "label"]
    filter_horizontal = ["members"]
    readonly_fields = ["public_key", "created_at"]


class SessionEventInline(admin.TabularInline):
    model = SessionEvent
    extra = 0
    can_delete = False
    readonly_fields = ["at", "from_state", "to_state", "cause"]

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
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
    readonly_fields = [f.name for f in Session._meta.fields if f.name != "api_key_encrypted"]
    exclude = ["api_key_encrypted"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # sessions start through the wizard or `manage.py sessions launch`, which validate and submit

    @admin.action(description="Cancel the selected sessions")
    def cancel_sessions(self, request: HttpRequest, queryset: QuerySet[Session]) -> None:
        for session in queryset:
            if not session.is_ended:
                request_cancel(session, f"cancelled by admin {request.user}")
        messages.info(request, "Cancellation requested.")
