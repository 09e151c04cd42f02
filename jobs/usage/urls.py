"""The usage pages' routes; included from jobs/urls.py, so they are named in its "jobs" namespace."""

from __future__ import annotations

from django.urls import URLPattern, path

from jobs.usage import views

urlpatterns: list[URLPattern] = [
    path("usage/", views.my_usage, name="usage"),
    path("usage/site/", views.site_usage, name="site-usage"),
    path("usage/site.csv", views.site_usage_csv, name="site-usage-csv"),
]
