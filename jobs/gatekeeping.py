"""A cluster's gate (portal/gate.py): every command the portal runs on a cluster, what an upload may hold, what a job
script may look like there, and the line a restricted key gets in ~/.ssh/authorized_keys.

    program(cluster) -> str          the gate, rendered for the cluster (its runtimes' binaries, modules and flags
                                     pinned): what a restricted key installs on first use
    key_line(account, permit_open)   the authorized_keys line naming that gate

The gate is rendered here, above both apps, from the verbs each defines where its command lives; a test checks that
no verb is left out. The jobs app's start hands `program` to portal.gate, which the catalog's ClusterAccount.run uses
to install a missing gate.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Sequence
from typing import Any

from catalog import add_model, inventory
from catalog.models import Cluster, ClusterAccount, ClusterRuntime
from catalog.runtime_rules import RUNTIMES
from jobs.cluster import capacity, jobscript, layout, login, measured, remote
from jobs.sessions import groups
from portal import gate

GATE_LOG = f"{layout.PORTAL_DIR}/gate.log"


def verbs() -> list[gate.Verb]:
    """Every verb of the portal's, in one list (tests/jobs/test_gatekeeping.py checks none is missing)."""
    return [
        *remote.VERBS,
        *measured.VERBS,
        *capacity.VERBS,
        *login.VERBS,
        *groups.VERBS,
        *inventory.VERBS,
        *add_model.VERBS,
    ]


def _pinned(cluster: Cluster) -> dict[str, list[str]]:
    """What the cluster's runtimes run, as a job script writes it: the binaries, modules and flags its catalog names
    (an admin's, not a portal process's, to choose). A job script naming anything else is refused by the gate."""
    binaries: set[str] = set()
    rpc_binaries = {jobscript.quoted("")}
    modules: set[str] = set()
    default_flags: set[str] = set()
    extra_flags: set[str] = set()
    converters = {jobscript.quoted("")}
    for row in ClusterRuntime.objects.filter(cluster=cluster).select_related("runtime"):
        binaries.add(jobscript.quoted(row.binary))
        rpc_binaries.add(jobscript.quoted(row.rpc_binary))
        modules.add(jobscript.quoted(tuple(row.modules.split())))
        default_flags.add(jobscript.quoted(tuple(shlex.split(row.runtime.default_flags))))
        extra_flags.add(jobscript.quoted(tuple(shlex.split(row.extra_flags))))
        if row.runtime.kind == "llama.cpp":  # a fine-tune run converts its adapter with the converter beside it
            converters.add(jobscript.quoted(jobscript.lora_converter(row.binary)))
    return {
        "SERVER_BIN": sorted(binaries),
        "RPC_BIN": sorted(rpc_binaries),
        "MODULES": sorted(modules),
        "DEFAULT_FLAGS": sorted(default_flags),
        "EXTRA_FLAGS": sorted(extra_flags),
        "LORA_CONVERTER": sorted(converters),
    }


def job_rules(cluster: Cluster) -> dict[str, Any]:
    """What a job script the gate accepts looks like: one of the portal's bodies, and a header of render's lines."""
    launched = sorted(name for name, rules in RUNTIMES.items() if rules.launchable)
    return {
        "body_starts": jobscript.BODY_STARTS,
        "bodies": sorted(
            hashlib.sha256(text.encode()).hexdigest()
            for text in [*(jobscript.body(name) for name in launched), jobscript.trainer_body()]
        ),
        "header": jobscript.header_rules(_pinned(cluster)),
    }


def program(cluster: Cluster) -> str:
    return gate.render(gate.table(verbs(), remote.helpers(), job_rules(cluster), GATE_LOG))


def key_line(account: ClusterAccount, permit_open: Sequence[str] = ()) -> str:
    """The account's authorized_keys line with its cluster's gate as the forced command."""
    text = program(account.cluster)
    return gate.authorized_keys_line(account.public_key, gate.program_path(text, layout.PORTAL_DIR), text, permit_open)


def install() -> None:
    """Let ClusterAccount.run install a restricted key's missing gate (the jobs app's ready())."""
    gate.renderer = program
