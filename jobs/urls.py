from __future__ import annotations

from django.urls import path

from jobs import proxy, views

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
    path("api/v1/<path:path>", proxy.api_proxy, name="api"),
    path("clusters/accounts/", views.cluster_accounts, name="accounts"),
    path("clusters/accounts/<int:pk>/test", views.account_test, name="account-test"),
]
