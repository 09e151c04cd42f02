from __future__ import annotations

from django.contrib import admin
from django.urls import path

from portal import views

admin.site.site_header = "HPC LLM Portal administration"
admin.site.site_title = "HPC LLM Portal"

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("admin/", admin.site.urls),
]
