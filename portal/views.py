from __future__ import annotations

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
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


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness for load balancers and the demo script: the database answers."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})
