"""The shell side of submit and poll: the commands the portal runs on a login host, and readers for their output.

Plain Python, no Django. Each operation is one SSH command: submit stages the session directory and calls sbatch
under a lock; poll asks squeue, sacct and scontrol about all of an account's sessions and reads their
connection files in a single round trip.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import secrets
import shlex
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from catalog.runtime_rules import RUNTIMES
from jobs.cluster import adaptercopy, jobscript, layout, slurm
from portal import gate, shellsafe
from portal.slurm.cli import PLAIN, SlurmCli
from portal.slurm.errors import SlurmParseError
from portal.slurm.hostlist import expand_hostlist
from portal.slurm.records import parse_job_records, parse_key_values
from portal.slurm.sacct import SACCT_OPTIONS, parse_sacct
from portal.slurm.sbatch import parse_sbatch_parsable, sbatch_error
from portal.slurm.squeue import SQUEUE_FIELDS, SQUEUE_FORMAT, QueuedJob, parse_squeue

# Exit codes of the submit script that mean "try again later".
SUBMIT_RETRY = 75


def script(body: str) -> str:
    """A script the portal runs on a login host: the layout's names (jobs/cluster/layout.py), then the portal's
    job-name prefix as $JOB_NAME_PREFIX (jobs/cluster/slurm.py), then the body, which spells neither again."""
    return layout.script(f"JOB_NAME_PREFIX={shlex.quote(slurm.JOB_NAME_PREFIX)}\n{body}")


# Runs on the login host as: bash -c SCRIPT submit UUID SHA256 <tar on stdin>.
# The lock and the job_id file make a repeated submit (a retry, a second worker) return the first job instead
# of creating another; the name lookup covers an sbatch that created the job but lost its reply. A cancel leaves a
# cancelled mark under the same lock (CANCEL_SCRIPT), so a submit that comes after it never calls sbatch. Every
# script here starts with the layout's names and the job-name prefix (script()).
SUBMIT_SCRIPT = script(r"""
set -u
umask 077
sid=$1 sum=$2 name="$JOB_NAME_PREFIX$1"
d="$SESSIONS_DIR/$sid"
mkdir -p "$d" && chmod 700 "$PORTAL_DIR" "$SESSIONS_DIR" "$d" || { echo "cannot create $d" >&2; exit 3; }
exec 9>"$d/$SUBMIT_LOCK"
flock -w 60 9 || { echo "another submit of this session is still running" >&2; exit 75; }
if [ -e "$d/$CANCELLED_MARK" ]; then echo "cancelled"; cat >/dev/null; exit 0; fi
if [ -s "$d/$JOB_ID_FILE" ]; then echo "existing $(cat "$d/$JOB_ID_FILE")"; cat >/dev/null; exit 0; fi
found=$(squeue -h -u "$(id -un)" -n "$name" -o %i 2>/dev/null | grep -E '^[0-9]' | head -n 1)
if [ -n "$found" ]; then echo "$found" >"$d/$JOB_ID_FILE"; echo "existing $found"; cat >/dev/null; exit 0; fi
cat >"$d/$UPLOAD_FILE"
echo "$sum  $d/$UPLOAD_FILE" | sha256sum -c --status || { echo "the upload was incomplete" >&2; exit 75; }
tar -xf "$d/$UPLOAD_FILE" -C "$d" && rm -f "$d/$UPLOAD_FILE" || { echo "cannot unpack into $d" >&2; exit 3; }
chmod 600 "$d/$API_KEY_FILE"
cd "$d" || exit 3
sbatch --parsable "$JOB_SCRIPT" >.sbatch.out 2>.sbatch.err
rc=$?
if [ "$rc" -eq 0 ]; then
  cut -d';' -f1 .sbatch.out >"$JOB_ID_FILE"
  echo "submitted $(cat "$JOB_ID_FILE")"
  exit 0
fi
cat .sbatch.err >&2
exit 64
""")

# Runs as: bash -c SCRIPT stage SESSION RUN SHA256 <tar on stdin>: a batch run on a running session, its files and
# the helpers the job runs it with (moved beside the job script). The job (batch.sh, supervise_batches) starts its
# supervisor once the start mark is there; staging twice changes nothing.
STAGE_BATCH_SCRIPT = script(r"""
set -u
umask 077
sid=$1 run=$2 sum=$3
d="$SESSIONS_DIR/$sid" r="$SESSIONS_DIR/$sid/$BATCH_DIR/$run"
[ -d "$d" ] || { echo "the session's directory is missing on the cluster" >&2; cat >/dev/null; exit 3; }
if [ -e "$r/$START_MARK" ]; then echo "staged"; cat >/dev/null; exit 0; fi
mkdir -p "$r" || { echo "cannot create $r" >&2; exit 3; }
cat >"$r/$UPLOAD_FILE"
echo "$sum  $r/$UPLOAD_FILE" | sha256sum -c --status || { echo "the upload was incomplete" >&2; exit 75; }
tar -xf "$r/$UPLOAD_FILE" -C "$r" && rm -f "$r/$UPLOAD_FILE" || { echo "cannot unpack into $r" >&2; exit 3; }
for f in "$r"/*.py; do mv -f "$f" "$d/" || exit 3; done
touch "$r/$START_MARK" && echo "staged"
""")

# Runs as: bash -c SCRIPT stop SESSION RUN: ask the job to stop a run's runner (what is done is kept).
STOP_BATCH_SCRIPT = script(r"""
r="$SESSIONS_DIR/$1/$BATCH_DIR/$2"
[ -d "$r" ] || { echo "nothing staged"; exit 0; }
touch "$r/$STOP_MARK" && echo "stopping"
""")


def _named(name: str) -> str:
    return f"^{re.escape(name)}\\Z"


# What a restricted key's gate lets an upload hold (portal/gate.py): the layout's files, the job script, the session
# key, the portal's own helpers byte for byte, and a batch launch's requests.
_HELPERS = sorted(
    {name for rules in RUNTIMES.values() for name in rules.job_files}
    | set(jobscript.BATCH_FILES)
    | set(jobscript.TRAINER_FILES)
)
_HELPER_NAMES = "^(?:" + "|".join(re.escape(name) for name in _HELPERS) + ")\\Z"
_UUID_PART = shellsafe.inner(shellsafe.UUID)
SUBMIT_UPLOAD = gate.Upload(
    (
        (_named(layout.NAMES.job_script), "job"),
        (_named(layout.NAMES.api_key_file), "key"),
        (_HELPER_NAMES, "helper"),
        (f"^{re.escape(layout.NAMES.batch_dir)}/{_UUID_PART}/{re.escape(layout.NAMES.requests_file)}\\Z", "data"),
        # A fine-tune run's checked data and settings (jobs/finetune/lifecycle.py).
        (_named(layout.NAMES.train_file), "data"),
        (_named(layout.NAMES.valid_file), "data"),
        (_named(layout.NAMES.train_config_file), "data"),
    )
)
STAGE_UPLOAD = gate.Upload(
    (
        (_named(layout.NAMES.requests_file), "data"),
        (_named(layout.NAMES.concurrency_file), "data"),
        (_HELPER_NAMES, "helper"),
    )
)


def helpers() -> list[str]:
    """Every helper a job may get beside its script, as the gate pins them."""
    return [(jobscript.SCRIPTS_DIR / name).read_text() for name in _HELPERS]


STAGE = gate.Verb(
    "stage", STAGE_BATCH_SCRIPT, args=(shellsafe.UUID, shellsafe.UUID, shellsafe.SHA256), upload=STAGE_UPLOAD
)
STOP = gate.Verb("stop", STOP_BATCH_SCRIPT, args=(shellsafe.UUID, shellsafe.UUID))


def stage_batch_command(session_id: str, run_id: str, sha256: str, *, gated: bool = False) -> str:
    return gate.command(STAGE, [session_id, run_id, sha256], gated=gated)


def stop_batch_command(session_id: str, run_id: str, *, gated: bool = False) -> str:
    return gate.command(STOP, [session_id, run_id], gated=gated)


# Runs as: bash -c SCRIPT cancel UUID [JOBID]. Under the submit lock: mark the session cancelled (a submit after this
# one never submits), then scancel its job by id when the portal knows it, and by name for one whose sbatch reply
# was lost or that a submit in flight created just before the mark.
CANCEL_SCRIPT = script(r"""
set -u
umask 077
sid=$1 jid=${2:-} name="$JOB_NAME_PREFIX$1"
d="$SESSIONS_DIR/$sid"
mkdir -p "$d" && chmod 700 "$d" || { echo "cannot create $d" >&2; exit 3; }
exec 9>"$d/$SUBMIT_LOCK"
flock -w 60 9 || { echo "a submit of this session still holds its lock" >&2; exit 75; }
: >"$d/$CANCELLED_MARK"
if [ -n "$jid" ]; then scancel "$jid" 2>&1; fi
scancel --name "$name" --user "$(id -un)" 2>&1 || { echo "scancel failed" >&2; exit 75; }
echo "marked"
""")

# Runs as: bash -c SCRIPT watch SECONDS UUID:MODE ... ; MODE is `starting` (waiting for the connection file or the
# error file) or `running` (waiting for the connection file to go: the job stopped, or its server restarted).
# Returns as soon as one session changed, printing `changed UUID ready|error|gone` lines, or after SECONDS with
# none. Builtin tests only (and a sleep): cheap on a busy login host.
WATCH_SCRIPT = script(r"""
set -u
end=$((SECONDS + $1))
shift
while :; do
  changed=0
  for pair in "$@"; do
    sid=${pair%%:*} d="$SESSIONS_DIR/${pair%%:*}" what=""
    if [ -f "$d/$ERROR_FILE" ]; then what=error
    elif [ "${pair#*:}" = starting ] && [ -f "$d/$CONNECTION_FILE" ]; then what=ready
    elif [ "${pair#*:}" = running ] && [ ! -f "$d/$CONNECTION_FILE" ]; then what=gone
    fi
    [ -z "$what" ] || { echo "changed $sid $what"; changed=1; }
  done
  [ "$changed" = 0 ] && [ "$SECONDS" -lt "$end" ] || break
  sleep 0.2
done
echo "@@end"
""")

WATCH_MODES = ("starting", "running")
WATCH_CHANGES = ("ready", "error", "gone")


WATCH = gate.Verb("watch", WATCH_SCRIPT, args=(shellsafe.COUNT,), more=shellsafe.WATCH_PAIR)


def watch_command(watched: list[tuple[str, str]], seconds: int, *, gated: bool = False) -> str:
    args = []
    for session_id, mode in watched:
        if not shellsafe.UUID.accepts(session_id) or mode not in WATCH_MODES:
            raise ValueError(f"bad session id or watch mode: {session_id!r} {mode!r}")
        args.append(f"{session_id}:{mode}")
    return gate.command(WATCH, [str(max(1, int(seconds))), *args], gated=gated)


def parse_watch(text: str) -> dict[str, str]:
    """Session id -> what the watch saw (ready, error, gone); empty: nothing within its time, or an answer cut
    short."""
    changes = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "changed" and shellsafe.UUID.accepts(words[1]) and words[2] in WATCH_CHANGES:
            changes[words[1]] = words[2]
    return changes


# Framed answers (the poll's and the listing's). A job's owner controls what its files hold and what its name is, and
# other users name their jobs as they like; none of it may be read as something else. So the answer is sections, one
# line each: "@@FRAME KIND ARG... BODY", where BODY is the base64 of what the section read (a file, a command's
# output), so no byte of it can start or end a line, and FRAME is made by the portal for this run alone and given on
# standard input (a command line is visible to every user of the login host). Records of squeue's whole queue, other
# users' job names among them, start with the frame too (squeue's format comes from the environment, which only the
# account's own processes can read), so a name with a newline stays inside its own record.
FRAMED = r"""
IFS= read -r frame || true
[[ $frame =~ ^[0-9a-f]{32}$ ]] || { echo "no frame on standard input" >&2; exit 2; }
shopt -s lastpipe  # a section at the end of a pipe runs in this shell: one process less a section
section() { printf '@@%s %s ' "$frame" "$*"; base64 -w 0; echo; }
"""

# Runs as: bash -c SCRIPT poll 0|1 UUID:JOBID ... <FRAME; prints framed sections (see FRAMED and parse_poll).
POLL_SCRIPT = (
    script(
        FRAMED
        + r"""
set -u
order=$1 me=$(id -un)
shift
# The portal's own jobs only, by their exact names (the prefix and the uuid): the user's other work (an array of
# thousands) must not swell the answer, and no job whose name merely starts so (with a newline after it) is listed.
names=()
for pair in "$@"; do names+=("$JOB_NAME_PREFIX${pair%%:*}"); done
live="" rc=0
for ((i = 0; i < ${#names[@]}; i += 1000)); do  # at most 1000 names a squeue: one argument holds 128 KiB
  chunk=$(IFS=,; echo "${names[*]:i:1000}")
  out=$(squeue -h -u "$me" -n "$chunk" -o '@FORMAT@' 2>&1) || { rc=$?; live=$out; break; }
  live+=$out$'\n'
done
if [ "$rc" -eq 0 ]; then
  live=$(printf '%s\n' "$live" | awk -F'|' -v prefix="$JOB_NAME_PREFIX" 'index($2, prefix) == 1')
  printf '%s\n' "$live" | section squeue "$rc"
else
  printf '%s\n' "$live" | head -c 2000 | section squeue "$rc"
fi
# Each pending portal job's place in its partition's queue (by priority), counted here: the cluster's whole queue
# would not fit in the answer on a busy site. Asked only when the portal says so ($order): reading a busy cluster's
# whole queue is the costly part of a poll, and one account's answer serves every account whose jobs it can see.
# Each record starts with the frame; a job's name comes last and is only looked at, never printed.
mine=$(printf '%s\n' "$live" | awk -F'|' '$3 == "PENDING" { print $1 }' | tr '\n' ' ')
if [ "$order" = 1 ] && [ -n "${mine// }" ]; then
  SQUEUE_FORMAT="$frame%P|%i|%j" squeue -h -t PENDING --sort=-p,i 2>/dev/null | awk -v RS="$frame" \
    -v prefix="$JOB_NAME_PREFIX" 'NR > 1 {
      i = index($0, "|"); rest = substr($0, i + 1); j = index(rest, "|")
      if (!i || !j) next
      part = substr($0, 1, i - 1); place[part]++
      if (index(substr(rest, j + 1), prefix) == 1) print part "|" substr(rest, 1, j - 1) "|" place[part]
    }'
fi | section order
# The addresses of the nodes our running jobs hold: a job may only say it serves on one of its own nodes.
nodes=$(printf '%s\n' "$live" | awk -F'|' '$3 != "PENDING" && $6 != "" && $6 != "(null)" { print $6 }' | paste -sd, -)
if [ -n "$nodes" ]; then
  out=$(scontrol -o show node "$nodes" 2>&1)
  rc_nodes=$?
  printf '%s\n' "$out" | head -c 200000 | section nodes "$rc_nodes"
fi
declare -A listed=()
if [ "$rc" -eq 0 ]; then
  while IFS='|' read -r jid _; do [ -n "$jid" ] && listed[$jid]=1; done <<<"$live"
fi
gone=()
uuid='^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
for pair in "$@"; do
  sid=${pair%%:*} jid=${pair#*:}
  # Builtins only in this loop but for the files a job wrote (a head and a base64 each): a thousand sessions must
  # not mean a thousand processes.
  if [ -n "$jid" ] && [ "$rc" -eq 0 ] && [ -z "${listed[$jid]+x}" ]; then gone+=("$jid"); fi
  d="$SESSIONS_DIR/$sid"
  if [ -f "$d/$CONNECTION_FILE" ]; then head -c 4096 -- "$d/$CONNECTION_FILE" | section connection "$sid"; fi
  if [ -f "$d/$STAGING_FILE" ]; then head -c 4096 -- "$d/$STAGING_FILE" | section staging "$sid"; fi
  if [ -f "$d/$ERROR_FILE" ]; then head -c 2000 -- "$d/$ERROR_FILE" | section error "$sid"; fi
  if [ -f "$d/$TRAIN_PROGRESS_FILE" ]; then head -c 32768 -- "$d/$TRAIN_PROGRESS_FILE" | section training "$sid"; fi
  # A run's folder is named by the portal, but the job's owner may make others: only a uuid goes on a header.
  for f in "$d/$BATCH_DIR"/*/"$PROGRESS_FILE"; do
    r=${f%/*} && r=${r##*/}
    [ -f "$f" ] && [[ $r =~ $uuid ]] || continue
    head -c 4096 -- "$f" | section progress "$sid" "$r"
  done
  for f in "$d/$BATCH_DIR"/*/"$RUN_ERROR_FILE"; do
    r=${f%/*} && r=${r##*/}
    [ -f "$f" ] && [[ $r =~ $uuid ]] || continue
    head -c 2000 -- "$f" | section batcherror "$sid" "$r"
  done
done
if [ "${#gone[@]}" -gt 0 ]; then
  ids=$(IFS=,; echo "${gone[*]}")
  out=$(sacct @SACCT@ -j "$ids" 2>&1)
  rc_gone=$?
  printf '%s\n' "$out" | section sacct "$rc_gone"
  for jid in "${gone[@]}"; do
    out=$(scontrol -o show job "$jid" 2>&1)
    rc_gone=$?
    printf '%s\n' "$out" | section scontrol "$rc_gone" "$jid"
  done
fi
section end </dev/null
"""
    )
    .replace("@FORMAT@", SQUEUE_FORMAT)
    .replace("@SACCT@", shlex.join(SACCT_OPTIONS))
)


# A listing record's fields for its awk: how many (the owner, then squeue's), where the name is (counted from the
# first field), and where the state and partition are, counted back from the last one: only the name may hold a '|',
# and SQUEUE_FORMAT puts them after it.
_LISTING_FIELDS = (
    f"-v fields={1 + len(SQUEUE_FIELDS)} -v name_at={2 + SQUEUE_FIELDS.index('%j')} "
    f"-v state_back={len(SQUEUE_FIELDS) - 1 - SQUEUE_FIELDS.index('%T')} "
    f"-v part_back={len(SQUEUE_FIELDS) - 1 - SQUEUE_FIELDS.index('%P')}"
)


# Runs as: bash -c SCRIPT listing <FRAME, with a cluster's status account (catalog Cluster.status_account): every
# portal job that account can see, whoever owns it, as "USER|<SQUEUE_FORMAT>|PLACE" (PLACE: a pending job's place in
# its partition's queue by priority, else empty), in one squeue sorted as the scheduler orders the queue, in one
# framed section (FRAMED). squeue's records start with the frame: anyone's job name may hold a newline or a '|', so a
# record's state and partition are counted from its end, and a record is printed only when it parses whole.
LISTING_SCRIPT = (
    script(
        FRAMED
        + r"""
set -u
out=$(SQUEUE_FORMAT="$frame%u|@FORMAT@" squeue -h --sort=-p,i 2>&1)
rc=$?
if [ "$rc" -eq 0 ] && [ -n "$out" ] && [[ $out != *"$frame"* ]]; then
  out="squeue did not begin its records with the frame, so they cannot be told apart" rc=70
fi
if [ "$rc" -eq 0 ]; then
  printf '%s' "$out" | awk -v RS="$frame" -v prefix="$JOB_NAME_PREFIX" @FIELDS@ 'NR > 1 {
    sub(/\n$/, ""); n = split($0, f, "|")
    if (n < fields) next
    if (f[n - state_back] == "PENDING") place[f[n - part_back]]++
    if (n == fields && index(f[name_at], prefix) == 1 && index($0, "\n") == 0)
      print $0 "|" (f[n - state_back] == "PENDING" ? place[f[n - part_back]] : "")
  }' | section listing "$rc"
else
  printf '%s\n' "$out" | head -c 2000 | section listing "$rc"
fi
section end </dev/null
"""
    )
    .replace("@FORMAT@", SQUEUE_FORMAT)
    .replace("@FIELDS@", _LISTING_FIELDS)
)


LISTING_MAX_BYTES = 32 << 20  # about 110 bytes a job: some 300,000 portal jobs


FRAME = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Framed:
    """A command whose answer comes in framed sections (FRAMED): the command line, and the frame made for this run
    alone, which goes on its standard input and is what its answer is read with (parse_poll, parse_listing)."""

    command: str
    frame: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def stdin(self) -> bytes:
        return f"{self.frame}\n".encode()


@dataclass(frozen=True)
class Section:
    kind: str
    args: tuple[str, ...]
    body: str


def sections(text: str, frame: str) -> Iterator[Section]:
    """The sections of a framed answer in order: each a line `@@FRAME KIND ARG... BASE64`. A line without the frame
    is none of the script's and is not read; a section whose body is not base64 is skipped."""
    if not FRAME.fullmatch(frame):
        raise ValueError("not a frame the portal makes")
    head = f"@@{frame} "
    for line in text.split("\n"):
        if not line.startswith(head):
            continue
        *words, body = line[len(head) :].split(" ")
        try:
            data = base64.b64decode(body, validate=True)
        except ValueError:  # binascii.Error, or a character that is not ASCII
            continue
        if words and words[0]:
            yield Section(words[0], tuple(words[1:]), data.decode(errors="replace"))


LISTING = gate.Verb("listing", LISTING_SCRIPT)


def listing_command(cli: SlurmCli = PLAIN, *, gated: bool = False) -> Framed:
    return Framed(gate.command(LISTING, [], cli, gated=gated))


@dataclass
class Listing:
    """What a status account's listing says: each portal job it sees with its owner, and each pending one's place.
    ok False: the scheduler could not be asked, and nothing may be read from it."""

    ok: bool = False
    error: str = ""
    jobs: dict[str, tuple[str, QueuedJob]] = field(default_factory=dict)  # job id -> (owner, job)
    places: dict[str, int] = field(default_factory=dict)  # job id -> place in its partition's queue


def parse_listing(text: str, frame: str) -> Listing:
    """What the listing script printed (the first listing section; nothing counts without the end's)."""
    listing = Listing()
    found = {section.kind: section for section in reversed(list(sections(text, frame)))}
    section = found.get("listing")
    if section is None or section.args != ("0",):
        listing.error = (section.body if section else text).strip()[:500] or "the listing printed nothing"
        return listing
    if "end" not in found:
        listing.error = "the listing was cut short"
        return listing
    for line in section.body.split("\n"):
        owner, _, fields = line.partition("|")
        fields, _, place = fields.rpartition("|")
        jobs, _bad = parse_squeue(fields)
        if len(jobs) != 1 or not owner:
            continue
        job = jobs[0]
        listing.jobs[job.job_id] = (owner, job)
        if place.isascii() and place.isdigit():
            listing.places[job.job_id] = int(place)
    listing.ok = True
    return listing


@dataclass(frozen=True)
class SubmitPayload:
    stdin: bytes
    sha256: str


def submit_payload(job_script: str, api_key: str, extra_files: dict[str, str]) -> SubmitPayload:
    """A tar of the session directory's files: the job script (0700), the API key (0600) and the runtime's
    helpers."""
    files = {layout.NAMES.job_script: (job_script, 0o700), layout.NAMES.api_key_file: (api_key + "\n", 0o600)}
    files.update({name: (text, 0o600) for name, text in extra_files.items()})
    return tar_payload(files)


def tar_payload(files: dict[str, tuple[str, int]]) -> SubmitPayload:
    """A tar of files (name: text and mode) to send on a command's standard input, with its SHA-256."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (text, mode) in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    return SubmitPayload(stdin=data, sha256=hashlib.sha256(data).hexdigest())


SUBMIT = gate.Verb("submit", SUBMIT_SCRIPT, args=(shellsafe.UUID, shellsafe.SHA256), upload=SUBMIT_UPLOAD)


def submit_command(session_id: str, sha256: str, cli: SlurmCli = PLAIN, *, gated: bool = False) -> str:
    return gate.command(SUBMIT, [session_id, sha256], cli, gated=gated)


@dataclass(frozen=True)
class SubmitOutcome:
    job_id: str  # empty when the session was cancelled before sbatch
    existing: bool
    cancelled: bool = False


def parse_submit(stdout: str) -> SubmitOutcome:
    for line in stdout.splitlines():
        word, _, value = line.strip().partition(" ")
        if word == "cancelled":
            return SubmitOutcome(job_id="", existing=False, cancelled=True)
        if word in {"submitted", "existing"}:
            return SubmitOutcome(job_id=parse_sbatch_parsable(value), existing=word == "existing")
    raise SlurmParseError(f"no job id in the submit output: {stdout.strip()[:200]!r}")


# sbatch failures that say nothing about the request itself: the controller is busy, down or unreachable.
_TRANSIENT_SBATCH = re.compile(
    r"Unable to contact slurm controller|Socket timed out|Connection refused|temporarily unable|"
    r"Resource temporarily unavailable|Zero Bytes were transmitted|backup controller|communication",
    re.IGNORECASE,
)


def sbatch_is_transient(stderr: str) -> bool:
    return bool(_TRANSIENT_SBATCH.search(stderr))


@dataclass(frozen=True)
class SubmitReply:
    """What the submit script's answer means: the job (or the cancel mark it found), a reason to try again later, or
    Slurm's refusal of the job itself, which trying again cannot change."""

    outcome: SubmitOutcome | None = None
    retry: str = ""
    refused: str = ""


def read_submit(exit_code: int, stdout: str, stderr: str) -> SubmitReply:
    """The submit script's exit code and output (SUBMIT_SCRIPT), read for a session's or a fine-tune run's submit."""
    if exit_code == 0:
        try:
            return SubmitReply(parse_submit(stdout))
        except SlurmParseError as exc:
            return SubmitReply(retry=str(exc))
    message = sbatch_error(stderr) if stderr.strip() else f"exit code {exit_code}"
    if exit_code == 64 and not sbatch_is_transient(stderr):
        return SubmitReply(refused=message)
    return SubmitReply(retry=message)


CANCEL = gate.Verb("cancel", CANCEL_SCRIPT, args=(shellsafe.UUID,), more=shellsafe.JOB_ID)


def cancel_command(session_id: str, job_id: str, cli: SlurmCli = PLAIN, *, gated: bool = False) -> str:
    """Cancel the session's job: by id when the portal knows it (else by name alone)."""
    return gate.command(CANCEL, [session_id, *([job_id] if job_id else [])], cli, gated=gated)


SCANCEL = gate.Verb("scancel", 'scancel "$@"', args=(shellsafe.JOB_ID,), more=shellsafe.JOB_ID)


def scancel_command(job_ids: list[str], cli: SlurmCli = PLAIN, *, gated: bool = False) -> str:
    """scancel of these jobs by id (the repeated cancels of jobs the portal lost)."""
    return gate.command(SCANCEL, job_ids, cli, gated=gated)


POLL = gate.Verb("poll", POLL_SCRIPT, args=(shellsafe.FLAG,), more=shellsafe.POLL_PAIR)


def poll_command(
    pairs: list[tuple[str, str]], cli: SlurmCli = PLAIN, order: bool = True, *, gated: bool = False
) -> Framed:
    """The poll of these (session, job) pairs; `order`: also each pending portal job's place in its queue."""
    args = [str(int(order))]
    for session_id, job_id in pairs:
        if not shellsafe.UUID.accepts(session_id) or (job_id and not shellsafe.JOB_ID.accepts(job_id)):
            raise ValueError(f"bad session or job id: {session_id!r} {job_id!r}")
        args.append(f"{session_id}:{job_id}")
    return Framed(gate.command(POLL, args, cli, gated=gated))


# A job's log and a batch run's results, read by the portal's pages (jobs/cluster/logs.py, jobs/batch/staging.py).
LOG = gate.Verb(
    "log",
    script('tail -c "$2" "$SESSIONS_DIR/$1/$JOB_LOG" 2>/dev/null || true\n'),
    args=(shellsafe.UUID, shellsafe.COUNT),
)
_RESULTS_FILE = 'f="$SESSIONS_DIR/$1/$BATCH_DIR/$2/$RESULTS_FILE"; [ "$3" = output ] && f="${f%/*}/$OUTPUT_FILE"\n'
HAS_RESULTS = gate.Verb(
    "has-results",
    script(_RESULTS_FILE + 'if [ -f "$f" ]; then echo yes; fi\n'),
    args=(shellsafe.UUID, shellsafe.UUID, shellsafe.RESULTS_KIND),
)
RESULTS = gate.Verb(
    "results", script(_RESULTS_FILE + 'exec cat "$f"\n'), args=(shellsafe.UUID, shellsafe.UUID, shellsafe.RESULTS_KIND)
)
# A fine-tune run's adapter, downloaded from its page (jobs/finetune/download.py): its size in KiB (nothing when there
# is none), then the directory as a gzipped tar on standard output.
ADAPTER_SIZE = gate.Verb(
    "adapter-size",
    script('d="$SESSIONS_DIR/$1/$ADAPTER_DIR"\nif [ -d "$d" ]; then du -sk "$d" | cut -f1; fi\n'),
    args=(shellsafe.UUID,),
)
ADAPTER = gate.Verb("adapter", script('exec tar -C "$SESSIONS_DIR/$1" -czf - "$ADAPTER_DIR"\n'), args=(shellsafe.UUID,))
# A shared adapter copied into the home of a session's cluster user when it is another than the run's
# (jobs/sessions/adapter_copies.py): on the run's account its size and checksum, then its files (ADAPTER_DIR and the
# GGUF) as a gzipped tar; on the session's, the checksum of the copy it holds, and the unpacking of the tar into
# $ADAPTERS_DIR/RUN (jobs/cluster/adaptercopy.py, whose text the scripts carry: a login host's python3 runs it).
ADAPTER_COPY_PROGRAM = Path(adaptercopy.__file__).read_text()
if "\nHPC_LLM_PORTAL_PY\n" in ADAPTER_COPY_PROGRAM:
    raise RuntimeError("adaptercopy.py must not hold its heredoc's terminator")
_WITH_PROGRAM = f"IFS= read -r -d '' prog <<'HPC_LLM_PORTAL_PY' || true\n{ADAPTER_COPY_PROGRAM}\nHPC_LLM_PORTAL_PY\n"
ADAPTER_MANIFEST = gate.Verb(
    "adapter-manifest",
    script(_WITH_PROGRAM + 'exec python3 -c "$prog" manifest "$SESSIONS_DIR/$1" "$ADAPTER_DIR" "$ADAPTER_GGUF"\n'),
    args=(shellsafe.UUID,),
)
ADAPTER_BUNDLE = gate.Verb(
    "adapter-bundle",
    script(
        'cd "$SESSIONS_DIR/$1" 2>/dev/null && [ -d "$ADAPTER_DIR" ] || { echo "the run has no adapter" >&2; exit 3; }\n'
        'set -- "$ADAPTER_DIR"\n[ ! -f "$ADAPTER_GGUF" ] || set -- "$@" "$ADAPTER_GGUF"\nexec tar -czf - -- "$@"\n'
    ),
    args=(shellsafe.UUID,),
)
ADAPTER_COPIED = gate.Verb(
    "adapter-copied",
    script(_WITH_PROGRAM + 'exec python3 -c "$prog" recorded "$ADAPTERS_DIR/$1"\n'),
    args=(shellsafe.UUID,),
)
ADAPTER_RECEIVE = gate.Verb(
    "adapter-receive",
    script(
        _WITH_PROGRAM
        + 'umask 077\nmkdir -p "$PORTAL_DIR" && chmod 700 "$PORTAL_DIR" || exit 3\n'
        + 'exec python3 -c "$prog" receive "$ADAPTERS_DIR/$1" "$2" "$3" "$ADAPTER_DIR" "$ADAPTER_GGUF"\n'
    ),
    args=(shellsafe.UUID, shellsafe.SHA256, shellsafe.COUNT),
)
ADAPTER_COPY_REFUSED = adaptercopy.REFUSED  # the copy cannot be made as it is (the scripts' own refusals exit so too)
VERBS = (
    SUBMIT, STAGE, STOP, CANCEL, SCANCEL, WATCH, POLL, LISTING, LOG, HAS_RESULTS, RESULTS, ADAPTER_SIZE, ADAPTER,
    ADAPTER_MANIFEST, ADAPTER_BUNDLE, ADAPTER_COPIED, ADAPTER_RECEIVE,
)  # fmt: skip


@dataclass
class PollResult:
    """What one poll learned. squeue_ok False means the scheduler could not be asked: nothing may end."""

    squeue_ok: bool = False
    squeue_error: str = ""
    queued: dict[str, QueuedJob] = field(default_factory=dict)  # by job id
    unreadable: list[str] = field(default_factory=list)
    # Job id -> its record, from sacct or scontrol, with scontrol's keys (JobState, ExitCode, EndTime...).
    finished: dict[str, dict[str, str]] = field(default_factory=dict)
    asked_gone: set[str] = field(default_factory=set)  # job ids sacct/scontrol were asked about successfully
    connections: dict[str, dict[str, object]] = field(default_factory=dict)  # session id -> connection.json
    errors: dict[str, str] = field(default_factory=dict)  # session id -> error file
    progress: dict[str, dict[str, object]] = field(default_factory=dict)  # batch run id -> its progress.json
    staging: dict[str, dict[str, object]] = field(default_factory=dict)  # session id -> its staging.json
    batch_errors: dict[str, str] = field(default_factory=dict)  # batch run id -> why the job gave its runner up
    training: dict[str, dict[str, object]] = field(default_factory=dict)  # fine-tune run id -> its trainer's progress
    positions: dict[tuple[str, str], int] = field(default_factory=dict)  # (partition, job id) -> place in its queue
    # Node name -> the names it answers to: itself, Slurm's NodeAddr and NodeHostName.
    node_names: dict[str, set[str]] = field(default_factory=dict)
    complete: bool = False

    def queue_position(self, partition: str, job_id: str) -> int | None:
        return self.positions.get((partition, job_id))

    def addresses_of(self, node_list: str) -> set[str] | None:
        """Every address the nodes of a hostlist answer to, as Slurm reports them; None when Slurm did not say."""
        try:
            nodes = expand_hostlist(node_list)
        except SlurmParseError:
            return None
        if not nodes or any(node not in self.node_names for node in nodes):
            return None
        return set().union(*(self.node_names[node] for node in nodes))


def _json_object(content: str) -> dict[str, object] | None:
    """A JSON object the job wrote (connection.json, staging.json, progress.json); None for anything else. They are
    written atomically: a torn read means the next poll sees the file whole."""
    try:
        data = json.loads(content)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


# A section that says something once a poll; the others once for each session, run or job they name.
_ONCE = {"squeue", "order", "nodes", "sacct", "end"}


def parse_poll(text: str, frame: str) -> PollResult:
    """Read the poll script's sections (FRAMED), each only the first time it comes. A section that failed counts as
    not asked, never as 'job gone'."""
    result = PollResult()
    seen: set[tuple[str, ...]] = set()
    for section in sections(text, frame):
        kind, args, content = section.kind, section.args, section.body.strip()
        key = (kind,) if kind in _ONCE else (kind, *(args[1:] if kind == "scontrol" else args))  # after its rc
        if key in seen:
            continue
        seen.add(key)
        if kind == "squeue":
            result.squeue_ok = args == ("0",)
            if result.squeue_ok:
                jobs, bad = parse_squeue(content)
                result.queued = {job.job_id: job for job in jobs}
                result.unreadable = bad
            else:
                result.squeue_error = content[:500]
        elif kind == "sacct" and args == ("0",):
            records, _unreadable = parse_sacct(content)
            result.finished.update(records)
            result.asked_gone.update(records)
        elif kind == "scontrol" and len(args) == 2:
            rc, job_id = args
            if rc == "0":
                records = parse_job_records(content)
                if job_id in records:
                    # scontrol is authoritative for jobs the controller still holds; sacct may lag behind it.
                    result.finished[job_id] = records[job_id]
                result.asked_gone.add(job_id)
            elif "Invalid job id" in content:
                result.asked_gone.add(job_id)
        elif kind == "connection" and len(args) == 1 and shellsafe.UUID.accepts(args[0]):
            if (data := _json_object(content)) is not None:
                result.connections[args[0]] = data
        elif kind == "staging" and len(args) == 1 and shellsafe.UUID.accepts(args[0]):
            if (data := _json_object(content)) is not None:
                result.staging[args[0]] = data
        elif kind == "training" and len(args) == 1 and shellsafe.UUID.accepts(args[0]):
            if (data := _json_object(content)) is not None:
                result.training[args[0]] = data
        elif kind == "progress" and len(args) == 2 and all(map(shellsafe.UUID.accepts, args)):
            if (data := _json_object(content)) is not None:
                result.progress[args[1]] = data
        elif kind == "batcherror" and len(args) == 2 and all(map(shellsafe.UUID.accepts, args)):
            result.batch_errors[args[1]] = content
        elif kind == "error" and len(args) == 1 and shellsafe.UUID.accepts(args[0]):
            result.errors[args[0]] = content
        elif kind == "order":
            for line in content.splitlines():
                partition, job_id, place = [*line.strip().split("|"), "", ""][:3]
                if shellsafe.JOB_ID.accepts(job_id) and place.isascii() and place.isdigit():
                    result.positions[partition, job_id] = int(place)
        elif kind == "nodes" and args == ("0",):
            for line in content.splitlines():
                record = parse_key_values(line)
                name = record.get("NodeName", "")
                if name:
                    # Only names a URL can take as its host: Slurm's own answer, checked all the same.
                    names = {name, record.get("NodeAddr", ""), record.get("NodeHostName", "")}
                    result.node_names[name] = {n for n in names if shellsafe.network_host(n)}
        elif kind == "end":
            result.complete = True
    return result
