"""The catalog's one public page: the home page, with the clusters and how many models and GPU types it knows."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from catalog.models import Cluster, GPUType, ModelCard


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    context = {
        "clusters": Cluster.objects.order_by("name"),
        "gpu_count": GPUType.objects.count(),
        "model_count": ModelCard.objects.count(),
    }
    return render(request, "home.html", context)
