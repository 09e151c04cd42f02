"""The wizard page's server time on a catalog of 100 models and 20 GPU options. A benchmark, not a test.

    .venv/bin/python bench/wizard.py [--requests 60]

The synthetic catalog of bench/estimate.py (100 models, dense and mixture-of-experts, GGUF and safetensors, on 20
GPU types in 20 node groups), imported through the YAML validation into a scratch SQLite database; a signed-in user
with an account on its cluster. Timed server side with Django's test client, after one warm-up: the wizard with a
model chosen (its estimate, breakdown bar and every option ranked; the scheduler is not asked:
PORTAL_WIZARD_ASKS_SLURM=0, its queue state comes from the cache the beat task fills), cycling over the models, and
as the htmx partial the page asks for when a choice changes. Baseline in the same run: the sessions page of the same
user (sign-in, middleware, a template and its queries: what any page costs). Printed: p50 and p95, the queries of
one request, and the targets (wizard <= 30 ms at p50; the query count the same for any catalog size, pinned by
tests/jobs/sessions/test_views.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.update(
    DJANGO_SETTINGS_MODULE="portal.settings",
    PORTAL_VAR_DIR=tempfile.mkdtemp(prefix="hpcllm-bench-wizard-"),
    PORTAL_LOG_LEVEL="WARNING",
    PORTAL_WIZARD_ASKS_SLURM="0",
)
os.environ.pop("DATABASE_URL", None)
os.environ.pop("REDIS_URL", None)

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402

from bench.synthetic import synthetic_catalog  # noqa: E402
from catalog.models import Cluster, ClusterAccount, ModelCard  # noqa: E402
from catalog.yaml_io import import_file  # noqa: E402


def timed(client: Client, paths: list[str], headers: dict[str, str] | None = None) -> tuple[list[float], int]:
    """Milliseconds of each request (one warm-up first), and the queries of one."""
    client.get(paths[0], headers=headers)
    with CaptureQueriesContext(connection) as queries:
        response = client.get(paths[0], headers=headers)
    assert response.status_code == 200, response.status_code
    count = len(queries)  # now: the next request's start empties the log the context reads
    times = []
    for path in paths:
        start = time.perf_counter()
        response = client.get(path, headers=headers)
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200
    return times, count


def line(label: str, times: list[float], queries: int, target: str = "") -> float:
    p50, p95 = statistics.median(times), statistics.quantiles(times, n=20)[18]
    print(f"{label:<34} p50 {p50:6.1f} ms   p95 {p95:6.1f} ms   {queries:>3} queries   {target}")
    return p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    # Pages rendered without collectstatic first, as the tests render them: no manifest to look names up in.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    call_command("migrate", verbosity=0)
    path = Path(os.environ["PORTAL_VAR_DIR"]) / "bench-catalog.yaml"
    synthetic_catalog(path)
    import_file(str(path))
    user = get_user_model().objects.create_user("bench")
    account = ClusterAccount(cluster=Cluster.objects.get(slug="bench"), user=user, kind="personal", username="bench")
    account.save()
    client = Client()
    client.force_login(user)
    names = list(ModelCard.objects.order_by("name").values_list("name", flat=True))
    wizard = [f"/launch/?model={names[i % len(names)]}&context=8192" for i in range(args.requests)]
    print(f"{len(names)} models, {Cluster.objects.get(slug='bench').partitions.get().node_groups.count()} GPU options")
    base_times, base_queries = timed(client, ["/sessions/"] * args.requests)
    base = line("baseline: the sessions page", base_times, base_queries)
    page_times, page_queries = timed(client, wizard)
    page = line("wizard, a model chosen", page_times, page_queries, "target: <= 30 ms at p50")
    htmx_times, htmx_queries = timed(client, wizard, headers={"HX-Request": "true", "HX-Target": "results"})
    line("wizard, htmx partial", htmx_times, htmx_queries)
    print(f"ratio wizard / baseline page: {page / base:.1f}x; target {'met' if page <= 30 else 'missed'}")


if __name__ == "__main__":
    main()
