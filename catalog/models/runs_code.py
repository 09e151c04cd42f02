"""The catalog's values that run as every researcher who launches with them: THE list, which the admin shows read-only
and the YAML import refuses to change for anyone without CODE_PERMISSION (docs/security.md).

Each reaches a job script (jobs/cluster/jobscript.py's JobSpec) or the command line of every Slurm command, run as the
researcher: the server's program and the modules loaded before it, the flags it gets, the Slurm binaries, the model
it loads and where its copy goes. Whoever sets them chooses what runs as every researcher on that cluster, so changing
them is as much as a shell as each of them: a superuser's, or that of staff an admin gave the permission to.
"""

from __future__ import annotations

from django.db import models

from catalog.models.cards import VariantLocation
from catalog.models.clusters import Cluster
from catalog.models.runtimes import ClusterRuntime, Runtime

CODE_PERMISSION = "catalog.change_runtime_code"

RUNS_CODE: dict[type[models.Model], tuple[str, ...]] = {
    Cluster: ("slurm_bin_dir", "stage_to"),  # Slurm's programs, by absolute path; where staging copies and evicts
    Runtime: ("default_flags",),
    ClusterRuntime: ("modules", "binary", "rpc_binary", "model_dir", "extra_flags"),
    # A location is the model a job loads (a GGUF or a Hugging Face directory, which can carry code of its own): its
    # path, tag and the cluster that path is read on, all of it.
    VariantLocation: ("cluster", "path", "ollama_tag"),
}


def changed_code(obj: models.Model, before: dict[str, object]) -> list[str]:
    """The fields of RUNS_CODE whose value on `obj` differs from `before` (attribute names to values, as
    `{f.attname: getattr(obj, f.attname)}`; for a new object, the model's defaults)."""
    fields = RUNS_CODE.get(type(obj), ())
    attnames = {name: obj._meta.get_field(name).attname for name in fields}  # type: ignore[union-attr]
    return [name for name in fields if before.get(attnames[name]) != getattr(obj, attnames[name])]
