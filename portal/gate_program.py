"""hpc-llm-portal's gate: the forced command of a restricted portal key. Python standard library only (3.8+).

sshd runs this instead of whatever the portal asks for, with the request in SSH_ORIGINAL_COMMAND:

    hpc-llm-portal-gate [--slurm-cluster NAME] [--slurm-bin DIR] VERB ARG...

It runs the portal's own script for VERB (the scripts and the rules for each argument are the table below, written
when the gate was rendered: portal/gate.py), after checking every argument and, for a verb that reads an upload,
every file in it; anything else (a shell, `bash -c ...`, an scp, an unknown verb, a bad argument) is refused, said on
standard error and logged (a log file in the portal's folder of the account's home, and syslog). A script runs in a
bash that reads no profile or rc file, so nothing in the account's dotfiles changes what a verb does.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import time
from typing import Any, NoReturn

REFUSED = 126  # the shell's "cannot execute": what a refused request exits with
LOG_MAX_BYTES = 1 << 20
MAX_UPLOAD_BYTES = 1 << 30
# The environment a script runs with: what sshd sets, without what would make bash run code before the script.
DROPPED = ("BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "CDPATH", "GLOBIGNORE", "PROMPT_COMMAND", "PS4")


LOG_FILE = ""  # relative to the home: set from the table (the portal's layout names it)


def log(line: str) -> None:
    """One line to the gate's log file (kept under a megabyte) and to syslog; never fails the request."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    client = os.environ.get("SSH_CONNECTION", "?").split(" ")[0]
    text = f"{stamp} {client} {line}"[:2000]
    try:
        path = os.path.join(os.path.expanduser("~"), LOG_FILE)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if os.path.exists(path) and os.path.getsize(path) > LOG_MAX_BYTES:
            os.replace(path, path + ".1")
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError:
        pass
    try:
        import syslog

        syslog.openlog("hpc-llm-portal-gate", 0, syslog.LOG_AUTH)
        syslog.syslog(syslog.LOG_NOTICE, text)
    except (ImportError, OSError):
        pass


def refuse(why: str, request: str) -> NoReturn:
    log(f"refused ({why}): {request[:500]!r}")
    sys.stderr.write(f"hpc-llm-portal gate: refused: {why}. This key runs only the portal's own commands.\n")
    sys.exit(REFUSED)


def matches(rule: dict[str, Any], value: str) -> bool:
    if len(value) > rule.get("max_length", 4096):
        return False
    return re.match(rule["regex"], value) is not None


def parse(request: str, table: dict[str, Any]) -> tuple[dict[str, str], str, list[str]]:
    """The request's Slurm options, verb and arguments, each checked; refuses anything else."""
    words = request.split(" ")
    if words[0] != table["word"] or not all(re.match(table["words"], w) for w in words[1:]):
        refuse("not a request of the portal's", request)
    options: dict[str, str] = {}
    rest = words[1:]
    while rest and rest[0].startswith("--"):
        name = rest[0][2:]
        if name not in table["options"] or len(rest) < 2 or name in options:
            refuse(f"unknown option {rest[0]}", request)
        if not matches(table["options"][name], rest[1]):
            refuse(f"bad value for {rest[0]}", request)
        options[name] = rest[1]
        rest = rest[2:]
    if not rest or rest[0] not in table["verbs"]:
        refuse("unknown verb", request)
    verb, args = rest[0], rest[1:]
    spec = table["verbs"][verb]
    fixed: list[dict[str, Any]] = spec["args"]
    if len(args) < len(fixed) or (spec["more"] is None and len(args) > len(fixed)):
        refuse(f"{verb} takes {len(fixed)} arguments", request)
    rules = [*fixed, *[spec["more"]] * (len(args) - len(fixed))]
    for index, value in enumerate(args):  # no zip(strict=): the gate runs on the login host's Python, 3.8 and up
        rule = rules[index]
        if not matches(rule, value):
            refuse(f"{verb}: argument {index + 1} is not {rule['what']}", request)
    return options, verb, args


def slurm_preamble(options: dict[str, str], table: dict[str, Any]) -> str:
    """The functions that make the script's bare Slurm commands name the cluster and the binaries' folder, as the
    portal's SlurmCli writes them (the templates were rendered from it)."""
    cluster, bin_dir = options.get("slurm-cluster", ""), options.get("slurm-bin", "")
    template: str = table["slurm"][("c" if cluster else "") + ("b" if bin_dir else "")]
    return template.replace(table["placeholders"]["cluster"], cluster).replace(
        table["placeholders"]["bin"], bin_dir.rstrip("/") or "/"
    )


def check_upload(data: bytes, upload: dict[str, Any], table: dict[str, Any], request: str) -> None:
    """A tar of regular files only, each named as the verb allows; the helpers byte for byte the portal's, the job
    script the portal's templates with quoted values (check_job_script)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for member in archive.getmembers():
                check_member(archive, member, upload, table, request)
    except tarfile.TarError:
        refuse("the upload is not a tar", request)


def check_member(
    archive: tarfile.TarFile, member: tarfile.TarInfo, upload: dict[str, Any], table: dict[str, Any], request: str
) -> None:
    if not member.isreg():
        refuse(f"{member.name!r} in the upload is not a plain file", request)
    kind = next((k for pattern, k in upload["members"] if re.match(pattern, member.name)), None)
    if kind is None:
        refuse(f"{member.name!r} has no place in this upload", request)
    extracted = archive.extractfile(member)
    content = extracted.read() if extracted else b""
    if kind == "helper" and hashlib.sha256(content).hexdigest() not in table["helpers"]:
        refuse(f"{member.name!r} is not one of the portal's helpers", request)
    if kind == "key" and not re.match(table["key"], content.decode("utf-8", "replace")):
        refuse("the key file is not a session key", request)
    if kind == "job":
        problem = check_job_script(content.decode("utf-8", "replace"), table["job"])
        if problem:
            refuse(f"the job script is not the portal's: {problem}", request)


def check_job_script(text: str, rules: dict[str, Any]) -> str:
    """'' when the script is a header the portal renders (#SBATCH lines it allows, comments, one quoted assignment a
    line) in front of a body that is byte for byte one of the portal's; else what is wrong."""
    start = text.find(rules["body_starts"])
    if start < 0:
        return "no job body"
    if hashlib.sha256(text[start:].encode()).hexdigest() not in rules["bodies"]:
        return "its body is not one the portal renders"
    for line in text[:start].split("\n"):
        if not any(re.match(pattern, line) for pattern in rules["header"]):
            return f"line {line[:80]!r}"
    return ""


def main(table: dict[str, Any]) -> int:
    global LOG_FILE
    LOG_FILE = table["log"]
    request = os.environ.get("SSH_ORIGINAL_COMMAND")
    if request is None:
        refuse("an interactive login", "")
    if request == table["word"] + " version":
        print(table["version"])
        return 0
    options, verb, args = parse(request, table)
    spec = table["verbs"][verb]
    script = slurm_preamble(options, table) + spec["script"]
    env = {k: v for k, v in os.environ.items() if k not in DROPPED and not k.startswith("BASH_FUNC_")}
    argv = ["bash", "--noprofile", "--norc", "-c", script, verb, *args]
    log(f"ran {verb} {' '.join(args)[:300]}")
    if spec["upload"] is None:
        os.execvpe("bash", argv, env)
    data = sys.stdin.buffer.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        refuse("the upload is too large", request)
    check_upload(data, spec["upload"], table, request)
    return subprocess.run(argv, input=data, env=env).returncode
