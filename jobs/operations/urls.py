"""The operators' routes; included from jobs/urls.py, so they are named in its "jobs" namespace."""

from __future__ import annotations

from django.urls import URLPattern, path

from jobs.operations import views

urlpatterns: list[URLPattern] = [
    path("metrics", views.metrics_view, name="metrics"),
    path("dashboard/", views.dashboard_view, name="dashboard"),
]
