"""Every route of the jobs app; the views live with their concern (sessions/views.py, use/views.py, use/proxy.py,
batch/views.py, services/pages.py, finetune/views.py)."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpResponseBase
from django.urls import include, path

from jobs.batch import views as batches
from jobs.finetune import views as finetunes
from jobs.services import pages as services
from jobs.sessions import views as sessions
from jobs.use import openai_batches, openai_finetunes, proxy
from jobs.use import views as use

app_name = "jobs"
# The chat's routes, after a session's path and a service's alike.
CHAT: list[tuple[str, Callable[..., HttpResponseBase], str]] = [
    ("chat/", use.chat, "chat"),
    ("chat/new", use.new_conversation, "chat-new"),
    ("chat/<int:conversation_id>/save", use.save_exchange, "chat-save"),
    ("chat/<int:conversation_id>/truncate", use.truncate, "chat-truncate"),
    ("chat/<int:conversation_id>/send", use.send_without_js, "chat-send"),
    ("chat/<int:conversation_id>/manage", use.manage_conversation, "chat-manage"),
    ("chat/<int:conversation_id>/export", use.export, "chat-export"),
]
urlpatterns = [
    path("launch/", sessions.launch_view, name="launch"),
    path("sessions/", sessions.session_list, name="sessions"),
    path("sessions/<uuid:pk>/", sessions.session_detail, name="session"),
    path("sessions/<uuid:pk>/card", sessions.session_card, name="card"),
    path("sessions/<uuid:pk>/cancel", sessions.session_cancel, name="cancel"),
    path("sessions/<uuid:pk>/delete", sessions.session_delete, name="delete"),
    path("sessions/<uuid:pk>/relaunch", sessions.session_relaunch, name="relaunch"),
    path("sessions/<uuid:pk>/log", sessions.session_log, name="log"),
    path("sessions/<uuid:pk>/share", sessions.session_share, name="share"),
    path("sessions/<uuid:pk>/share/<int:share_pk>/revoke", sessions.session_unshare, name="unshare"),
    path("services/", services.service_list, name="services"),
    path("services/new/", services.service_new, name="service-new"),
    path("services/<str:name>/", services.service_detail, name="service"),
    path("services/<str:name>/scale", services.service_scale, name="service-scale"),
    path("services/<str:name>/stop", services.service_stop, name="service-stop"),
    path("clusters/accounts/", sessions.cluster_accounts, name="accounts"),
    path("clusters/accounts/<int:pk>/test", sessions.account_test, name="account-test"),
    path("sessions/<uuid:pk>/v1/<path:path>", proxy.session_proxy, name="session-proxy"),
    *[path(f"sessions/<uuid:pk>/{route}", view, name=name) for route, view, name in CHAT],
    path("services/<str:name>/v1/<path:path>", proxy.service_proxy, name="service-proxy"),
    *[path(f"services/<str:name>/{route}", view, name=f"service-{name}") for route, view, name in CHAT],
    # OpenAI's Files and Batch API (use/openai_batches.py), before the proxy's catch-all.
    path("api/v1/files", openai_batches.files, name="api-files"),
    path("api/v1/files/<str:file_id>", openai_batches.file_detail, name="api-file"),
    path("api/v1/files/<str:file_id>/content", openai_batches.file_content, name="api-file-content"),
    path("api/v1/batches", openai_batches.batches, name="api-batches"),
    path("api/v1/batches/<str:batch_id>", openai_batches.batch_detail, name="api-batch"),
    path(
        "api/v1/batches/<str:batch_id>/cancel",
        openai_batches.batch_detail,
        {"action": "cancel"},
        name="api-batch-cancel",
    ),
    # OpenAI's fine-tuning API (use/openai_finetunes.py), before the proxy's catch-all too.
    path("api/v1/fine_tuning/jobs", openai_finetunes.fine_tuning_jobs, name="api-ft-jobs"),
    path("api/v1/fine_tuning/jobs/<str:job_id>", openai_finetunes.job_detail, name="api-ft-job"),
    path(
        "api/v1/fine_tuning/jobs/<str:job_id>/cancel",
        openai_finetunes.job_detail,
        {"action": "cancel"},
        name="api-ft-job-cancel",
    ),
    path("api/v1/fine_tuning/jobs/<str:job_id>/events", openai_finetunes.job_events, name="api-ft-job-events"),
    path(
        "api/v1/fine_tuning/jobs/<str:job_id>/checkpoints",
        openai_finetunes.job_checkpoints,
        name="api-ft-job-checkpoints",
    ),
    path("api/v1/<path:path>", proxy.api_proxy, name="api"),
    path("tokens/", use.api_tokens, name="tokens"),
    path("batch/", batches.batch_list, name="batches"),
    path("batch/new/", batches.new_batch_launch, name="batch-new"),
    path("batch/<uuid:pk>/", batches.batch_run, name="batch"),
    path("batch/<uuid:pk>/output/<str:fmt>", batches.batch_output, name="batch-output"),
    path("batch/<uuid:pk>/stop", batches.stop_run, name="batch-stop"),
    path("sessions/<uuid:pk>/batch/new", batches.new_session_run, name="session-batch-new"),
    path("finetune/", finetunes.finetune_list, name="finetunes"),
    path("finetune/new/", finetunes.finetune_new, name="finetune-new"),
    path("finetune/<uuid:pk>/", finetunes.finetune_detail, name="finetune"),
    path("finetune/<uuid:pk>/cancel", finetunes.finetune_cancel, name="finetune-cancel"),
    path("finetune/<uuid:pk>/adapter.tar.gz", finetunes.finetune_adapter, name="finetune-adapter"),
    path("finetune/<uuid:pk>/compare/", finetunes.finetune_compare, name="finetune-compare"),
    path("finetune/<uuid:pk>/compare/<uuid:comparison>/", finetunes.finetune_comparison, name="finetune-comparison"),
    path("finetune/<uuid:pk>/share", finetunes.finetune_share, name="finetune-share"),
    path("finetune/<uuid:pk>/share/<int:share_pk>/revoke", finetunes.finetune_unshare, name="finetune-unshare"),
    path("", include("jobs.usage.urls")),
    path("", include("jobs.operations.urls")),
]
