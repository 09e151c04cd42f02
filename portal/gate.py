"""The portal's commands on a cluster, by name (verbs), and the gate: the program a restricted key runs instead of a
shell (authorized_keys `restrict,command="..."`), which runs these and nothing else. Plain Python, no Django.

Every command the portal runs over SSH is a Verb: a bash script that takes its arguments as $1..., and an allow-list
(portal/shellsafe.py) for each argument. What the SSH connection sends (`command`):

- an account with a plain key: `bash -c SCRIPT VERB ARG...`, the script with the command, as always;
- a restricted key: `hpc-llm-portal-gate [--slurm-cluster C] [--slurm-bin D] VERB ARG...`. sshd runs the gate
  instead, with that line in SSH_ORIGINAL_COMMAND; the gate holds the same scripts (rendered from the verbs:
  `render`) and checks every argument again, on the cluster, before it runs one.

Both apps define their verbs where their commands live (jobs/cluster/remote.py, catalog/add_model.py, ...); the gate
is rendered from all of them (jobs/cluster/gatekeeping.py), with what an upload may hold.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portal import shellsafe
from portal.slurm.cli import PLAIN, SlurmCli

GATE_WORD = "hpc-llm-portal-gate"  # the first word of every request to the gate
PROGRAM = Path(__file__).resolve().with_name("gate_program.py")
NOT_INSTALLED = 125  # what a restricted key's line answers while its gate is not in place yet
INSTALL_REQUEST = f"{GATE_WORD} install"  # the line then keeps the gate it is sent, if it is the one it names
INSTALL_MAX_BYTES = 4 << 20
# How the portal renders a cluster's gate (jobs/gatekeeping.py sets it when the jobs app starts): an account's key
# installs it on first use (catalog's ClusterAccount.run). Typed loosely: the portal knows no catalog.
renderer: Callable[[Any], str] | None = None
_PLACEHOLDERS = {"cluster": "hpcllmgateslurmcluster", "bin": "/gate-slurm-bin-placeholder"}


class GateError(ValueError):
    """A verb called with an argument its allow-list refuses (a bug upstream: it is checked before)."""


@dataclass(frozen=True)
class Upload:
    """What a verb reads on its standard input: a tar whose files each match one of `members` (a regex on the name,
    and a kind: "data" anything, "key" a session key, "helper" one of the portal's job helpers byte for byte, "job" a
    job script of the portal's templates)."""

    members: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Verb:
    name: str
    script: str  # bash; its arguments are $1, $2, ...
    args: tuple[shellsafe.AllowList, ...] = ()
    more: shellsafe.AllowList | None = None  # any number of further arguments of this kind
    upload: Upload | None = None

    def check(self, args: Sequence[str]) -> list[str]:
        """The arguments as given, once each passed its allow-list; GateError otherwise."""
        if len(args) < len(self.args) or (self.more is None and len(args) > len(self.args)):
            raise GateError(f"{self.name} takes {len(self.args)} arguments, not {len(args)}")
        more = [self.more] * (len(args) - len(self.args)) if self.more else []
        for index, (allowed, value) in enumerate(zip([*self.args, *more], args, strict=True)):
            if not allowed.accepts(value) or not value:
                raise GateError(f"{self.name}: argument {index + 1} {value!r} is refused. {allowed.message}")
        return list(args)


def command(verb: Verb, args: Sequence[str] = (), cli: SlurmCli = PLAIN, *, gated: bool = False) -> str:
    """What to send over SSH for the verb: the gate's request for a restricted key, else the script itself."""
    words = verb.check(args)
    if gated:
        options = [*(["--slurm-cluster", cli.cluster] if cli.cluster else [])]
        options += ["--slurm-bin", cli.bin_dir] if cli.bin_dir else []
        return " ".join([GATE_WORD, *options, verb.name, *words])
    return shlex.join(["bash", "-c", cli.script(verb.script), verb.name, *words])


def _rule(allowed: shellsafe.AllowList, what: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"regex": allowed.regex, "what": what}
    if allowed.max_length:
        rule["max_length"] = allowed.max_length
    return rule


def _slurm_templates() -> dict[str, str]:
    """SlurmCli's preamble for each combination of a cluster name and a binaries' folder, with placeholders the gate
    fills in from the request's (checked) options: one definition of what a Slurm command becomes."""
    cluster, bin_dir = _PLACEHOLDERS["cluster"], _PLACEHOLDERS["bin"]
    clis = {"": PLAIN, "c": SlurmCli(cluster), "b": SlurmCli("", bin_dir), "cb": SlurmCli(cluster, bin_dir)}
    return {key: cli.script("") for key, cli in clis.items()}


def table(verbs: Sequence[Verb], helpers: Sequence[str], job: dict[str, Any], log: str) -> dict[str, Any]:
    """The gate's table: its verbs with their scripts and rules, the Slurm options, the helpers' SHA-256, what a job
    script may look like (`job`: {"body_starts": marker, "bodies": [sha256...], "header": [regex...]}) and where it
    logs (`log`, relative to the home)."""
    names = [verb.name for verb in verbs]
    if len(set(names)) != len(names) or "version" in names:
        raise GateError(f"verb names must be unique and not 'version': {sorted(names)}")
    entries = {
        verb.name: {
            "script": verb.script,
            "args": [_rule(allowed, f"a {verb.name} argument") for allowed in verb.args],
            "more": _rule(verb.more, f"a {verb.name} argument") if verb.more else None,
            "upload": {"members": [list(m) for m in verb.upload.members]} if verb.upload else None,
        }
        for verb in verbs
    }
    return {
        "verbs": entries,
        "options": {
            "slurm-cluster": _rule(shellsafe.SLURM_NAME, "a Slurm cluster name"),
            "slurm-bin": _rule(shellsafe.ABSOLUTE_PATH, "a folder of Slurm's binaries"),
        },
        "slurm": _slurm_templates(),
        "placeholders": _PLACEHOLDERS,
        "helpers": sorted(hashlib.sha256(text.encode()).hexdigest() for text in helpers),
        "job": job,
        # An uploaded key file holds the key and a newline.
        "key": shellsafe.SESSION_KEY.regex.removesuffix("\\Z") + "\n?\\Z",
        "word": GATE_WORD,
        "words": shellsafe.GATE_WORD.regex,
        "log": log,
    }


def render(gate_table: dict[str, Any]) -> str:
    """The gate program: gate_program.py with its table; its first line after the shebang names its version (the
    SHA-256 of the table), which `hpc-llm-portal-gate version` prints."""
    body = json.dumps(gate_table, sort_keys=True)
    version = hashlib.sha256(body.encode()).hexdigest()[:16]
    return (
        f"#!/usr/bin/env python3\n# hpc-llm-portal gate {version}: rendered by the portal; do not edit.\n"
        + PROGRAM.read_text()
        + f"\n\nTABLE = {body!r}\n\nif __name__ == '__main__':\n    import json as _json\n\n"
        + f"    _table = _json.loads(TABLE)\n    _table['version'] = {version!r}\n    sys.exit(main(_table))\n"
    )


def version_of(program: str) -> str:
    """The version a rendered gate names on its second line."""
    line = program.split("\n", 2)[1]
    return line.split(" ")[3].rstrip(":") if line.startswith("# hpc-llm-portal gate ") else ""


def forced_command(path: str, program: str) -> str:
    """The command a restricted key's authorized_keys line runs whatever the portal asks (POSIX sh, whatever the
    account's login shell): `install` keeps the gate sent on standard input if its SHA-256 is this program's, and
    nothing else; any other request goes to that gate, which is refused until it is in place. `path` is the gate's
    file relative to the home; the portal can only ever install the exact gate the line names."""
    digest = hashlib.sha256(program.encode()).hexdigest()
    return (
        f'f="$HOME/{path}"; '
        f'if [ "$SSH_ORIGINAL_COMMAND" = "{INSTALL_REQUEST}" ]; then umask 077; mkdir -p "${{f%/*}}" && '
        f'head -c {INSTALL_MAX_BYTES} >"$f.tmp" && [ "$(sha256sum <"$f.tmp")" = "{digest}  -" ] && '
        f'mv -f "$f.tmp" "$f" && echo installed && exit 0; rm -f "$f.tmp"; '
        f'echo "{GATE_WORD}: refused: not the gate this key names" >&2; exit 126; fi; '
        f'[ -f "$f" ] || {{ echo "{GATE_WORD}: not installed" >&2; exit {NOT_INSTALLED}; }}; exec python3 "$f"'
    )


def authorized_keys_line(public_key: str, path: str, program: str, permit_open: Sequence[str] = ()) -> str:
    """The line for ~/.ssh/authorized_keys: `restrict` (no forwarding, no pty, no agent or X11, no ~/.ssh/rc), the
    forced command (sh, so any login shell runs it alike), and port forwarding back only to `permit_open`
    (HOST:PORT, PORT may be *) where the cluster reaches its nodes through SSH tunnels."""
    # sshd's options unquote \" alone (auth-options.c opt_dequote); the command has no backslash or single quote.
    inner = forced_command(path, program).replace('"', '\\"')
    options = ["restrict", f"command=\"/bin/sh -c '{inner}'\""]
    if permit_open:
        options.append("port-forwarding")
        options += [f'permitopen="{target}"' for target in permit_open]
    return ",".join(options) + " " + public_key


def program_path(program: str, folder: str) -> str:
    """Where a gate lives in the home: named by its version, so a new gate never replaces the one a key names."""
    return f"{folder}/gate-{version_of(program)}.py"
