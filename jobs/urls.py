from __future__ import annotations

from django.urls import path

from jobs import chat_views, proxy, views

app_name = "jobs"
urlpatterns = [
    path("launch/", views.launch_view, name="launch"),
    path("sessions/", views.session_list, name="sessions"),
    path("sessions/<uuid:pk>/", views.session_detail, name="session"),
    path("sessions/<uuid:pk>/card", views.session_card, name="card"),
    path("sessions/<uuid:pk>/cancel", views.session_cancel, name="cancel"),
    path("sessions/<uuid:pk>/delete", views.session_delete, name="delete"),
    path("sessions/<uuid:pk>/relaunch", views.session_relaunch, name="relaunch"),
    path("sessions/<uuid:pk>/log", views.session_log, name="log"),
    path("sessions/<uuid:pk>/v1/<path:path>", proxy.session_proxy, name="session-proxy"),
    path("sessions/<uuid:pk>/chat/", chat_views.chat, name="chat"),
    path("sessions/<uuid:pk>/chat/new", chat_views.new_conversation, name="chat-new"),
    path("sessions/<uuid:pk>/chat/<int:conversation_id>/save", chat_views.save_exchange, name="chat-save"),
    path("sessions/<uuid:pk>/chat/<int:conversation_id>/truncate", chat_views.truncate, name="chat-truncate"),
    path("sessions/<uuid:pk>/chat/<int:conversation_id>/send", chat_views.send_without_js, name="chat-send"),
    path("sessions/<uuid:pk>/chat/<int:conversation_id>/manage", chat_views.manage_conversation, name="chat-manage"),
    path("sessions/<uuid:pk>/chat/<int:conversation_id>/export", chat_views.export, name="chat-export"),
    path("api/v1/<path:path>", proxy.api_proxy, name="api"),
    path("clusters/accounts/", views.cluster_accounts, name="accounts"),
    path("tokens/", views.api_tokens, name="tokens"),
    path("clusters/accounts/<int:pk>/test", views.account_test, name="account-test"),
]
