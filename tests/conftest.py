from __future__ import annotations

import copy
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.apps import apps
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.contrib.auth.models import Group
from django.core import serializers
from django.core.cache import cache
from django.core.management.color import no_style
from django.db import connection, transaction
from django.db.models import Model
from django.test.utils import override_settings

from catalog.models import Cluster, ClusterAccount
from catalog.yaml_io import import_file
from jobs.apps import SUPPORT_GROUP

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CATALOG = REPO / "catalog" / "examples" / "catalog.yaml"
LOCAL_CLUSTER_SCRIPT = REPO / "scripts" / "local-cluster"
# One 1-GPU tiny-llama session on the local cluster, as launch() takes it; tests change only what they are about.
LAUNCH = {
    "cluster": "local",
    "partition": "gpu",
    "gpu": "a100-80g",
    "gpus": 1,
    "model": "tiny-llama",
    "quant": "F16",
    "runtime": "llama.cpp",
    "context": 1024,
    "walltime": 30,
}
# A pinned host key for the example catalog's local cluster where no cluster runs (unit tests).
HOST_KEY = "[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
LOCAL_CLUSTER_DIR = Path(os.environ.get("LOCAL_CLUSTER_DIR", REPO / "var" / "local-cluster"))


class OneRoundPBKDF2(PBKDF2PasswordHasher):
    """Django's own PBKDF2 at one iteration: creating a user costs microseconds instead of a third of a second. The
    hashes keep the production hasher's name and carry their iteration count, so a portal process started by a test
    with the real settings (uvicorn, a worker) still verifies them."""

    iterations = 1


@pytest.fixture(autouse=True, scope="session")
def _fast_password_hasher() -> Iterator[None]:
    with override_settings(PASSWORD_HASHERS=[f"{__name__}.OneRoundPBKDF2"]):
        yield


@pytest.fixture(autouse=True)
def _plain_static_files(settings: Any) -> None:
    """Tests render pages without running collectstatic first, so no manifest is needed."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture(autouse=True)
def _empty_cache(settings: Any) -> None:
    """The cache is shared by processes: no test sees what another left there. A Redis cache is left alone, since
    clearing it would flush the broker's database too (no test that runs on Redis uses the cache)."""
    if "redis" not in settings.CACHES["default"]["BACKEND"]:
        cache.clear()


@pytest.fixture(autouse=True)
def _no_jobs_left_over(request: pytest.FixtureRequest) -> None:
    """An e2e test starts on free nodes: jobs an earlier test left behind (its fixture failed before its own clean-up)
    are cancelled first, so that one failure does not starve every test after it."""
    if request.node.get_closest_marker("e2e") is None:
        return
    from tests.e2e.sessions import cancel_all_jobs

    cancel_all_jobs()


@pytest.fixture
def owner(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("ada", "ada@example.edu", "correct horse battery")


@pytest.fixture
def other_user(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("grace", "grace@example.edu", "correct horse battery")


@pytest.fixture
def lab(db: None) -> Group:
    """A lab's group, which the owner is in."""
    return Group.objects.create(name="nlp-lab")


@pytest.fixture
def shared_user(django_user_model: Any, lab: Group, owner: Any) -> Any:
    """A member of the owner's lab: sessions are shared with them through the lab's group."""
    owner.groups.add(lab)
    user = django_user_model.objects.create_user("alan", "alan@example.edu", "correct horse battery")
    user.groups.add(lab)
    return user


@pytest.fixture
def staff_user(django_user_model: Any) -> Any:
    """Staff who may open the admin, without the permission to see others' sessions."""
    return django_user_model.objects.create_user("hopper", "hopper@example.edu", "correct horse battery", is_staff=True)


@pytest.fixture
def support_user(django_user_model: Any) -> Any:
    """Staff an admin put in the "Session support" group: they see and use every user's sessions."""
    user = django_user_model.objects.create_user("lovelace", "lovelace@example.edu", "correct horse battery",
                                                 is_staff=True)  # fmt: skip
    user.groups.add(Group.objects.get(name=SUPPORT_GROUP))
    return user


def catalog_models() -> list[type[Model]]:
    """The catalog's tables in an order that inserts each row after the rows it refers to (many-to-many tables last)."""
    app = apps.get_app_config("catalog")
    ordered = serializers.sort_dependencies([(app, None)])
    return [*ordered, *(m for m in app.get_models(include_auto_created=True) if m._meta.auto_created)]


@pytest.fixture(scope="session")
def _example_catalog_rows(django_db_setup: None, django_db_blocker: Any) -> list[list[Model]]:
    """The example catalog as the YAML import writes it, imported once a test run (a third of a second and some 700
    queries a time) and rolled back; each test that asks for it gets the same rows back in one insert a table."""
    rows: list[list[Model]] = []
    with django_db_blocker.unblock(), transaction.atomic():
        import_file(str(EXAMPLE_CATALOG))
        rows = [list(model._base_manager.order_by("pk")) for model in catalog_models()]
        transaction.set_rollback(True)
    return rows


@pytest.fixture
def example_catalog(db: None, _example_catalog_rows: list[list[Model]]) -> Path:
    """The example catalog imported, with the rows and primary keys the import gives it."""
    for table in _example_catalog_rows:
        if table:
            type(table[0])._base_manager.bulk_create([copy.copy(row) for row in table])
    # Rows written with their keys leave PostgreSQL's sequences behind: the next row a test creates would collide.
    with connection.cursor() as cursor:
        for statement in connection.ops.sequence_reset_sql(no_style(), catalog_models()):
            cursor.execute(statement)
    return EXAMPLE_CATALOG


@pytest.fixture
def account(example_catalog: Path, owner: Any) -> ClusterAccount:
    """The owner's personal account on the example catalog's local cluster (a fake pinned key: no cluster needed)."""
    Cluster.objects.filter(slug="local").update(host_key=HOST_KEY)
    account = ClusterAccount(cluster=Cluster.objects.get(slug="local"), user=owner, username="ada")
    account.save()
    return account


@pytest.fixture(scope="session")
def local_cluster() -> dict[str, Any]:
    """The real local Slurm cluster; started here when it is not running (needs root, as in make test)."""
    status = subprocess.run([LOCAL_CLUSTER_SCRIPT, "status"], capture_output=True, text=True)
    if status.returncode != 0:
        up = subprocess.run([LOCAL_CLUSTER_SCRIPT, "up"], capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            pytest.fail(f"scripts/local-cluster up failed:\n{up.stdout}\n{up.stderr}")
    info: dict[str, Any] = json.loads((LOCAL_CLUSTER_DIR / "cluster.json").read_text())
    return info


@pytest.fixture
def local_catalog(db: None, local_cluster: dict[str, Any]) -> dict[str, Any]:
    """The local cluster's own catalog entry (host key pinned) imported into the test database."""
    import_file(local_cluster["catalog"])
    return local_cluster


@pytest.fixture
def smollm2(local_catalog: dict[str, Any]) -> str:
    """SmolLM2-135M-Instruct (scripts/fetch-models) on the local cluster, its card filled from its own GGUF header
    as `catalog add-model` fills it; returns the card's name."""
    from catalog.add_model import add, inspect

    path = local_catalog["models"]["smollm2"]
    return add(inspect(path), path, Cluster.objects.get(slug="local")).card.name


# A SmolLM2 session, as launch() takes it: the real model, for tests about what a model answers.
SMOLLM2_LAUNCH = {**LAUNCH, "model": "SmolLM2-135M-Instruct", "quant": "Q4_1", "context": 2048}


LOCAL_SERVICES_SCRIPT = REPO / "scripts" / "local-services"


@pytest.fixture(scope="session")
def local_services() -> dict[str, str]:
    """Real PostgreSQL and Redis on loopback (scripts/local-services); started here when not running."""
    if subprocess.run([LOCAL_SERVICES_SCRIPT, "status"], capture_output=True).returncode != 0:
        up = subprocess.run([LOCAL_SERVICES_SCRIPT, "up"], capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            pytest.fail(f"scripts/local-services up failed:\n{up.stdout}\n{up.stderr}")
    out = subprocess.run([LOCAL_SERVICES_SCRIPT, "env"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.split())


@pytest.fixture(autouse=True)
def _no_load_publisher(settings: Any) -> None:
    """Service replicas' load is published by a thread of its own in a real process; a test publishes by calling
    jobs.services.load.publish(), so that no thread touches the test's database behind it."""
    settings.PORTAL_SERVICE_LOAD_EVERY_MS = 0
