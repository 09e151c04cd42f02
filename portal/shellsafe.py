"""THE allow-lists for values that reach a shell or a Slurm command line: names, paths, ids and flags.

Each value the portal puts into a command it runs over SSH or into a job script (a partition, an account, a binaries
folder, a session's uuid...) is checked against one of these lists wherever it came from: the admin's form, a YAML
import, discovery, the database. Each list is defined once, with the message a person reads when a value is refused;
catalog/validators.py builds the models' Django validators from them, and the Slurm command builder, the job script
renderer and the submit and poll commands check with them. Plain Python, no Django.

The promise, checked by property tests: whatever a list accepts (besides the empty string, and the few values it
names in `expands`) is one shell word that needs no quoting, `shlex.quote(value) == value`, and holds no newline.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass, field


class UnsafeValue(ValueError):
    """A value that may not reach a shell; the message says what is allowed."""


@dataclass(frozen=True)
class AllowList:
    """One allow-list. `regex` is anchored as Django's RegexValidator takes it (`^...\\Z`: `$` would let a trailing
    newline through); the models' validators are built from the same string, so their migrations see no change."""

    regex: str
    message: str
    max_length: int | None = None  # where the value's own rules bound it (Slurm's names); else the model's field does
    expands: tuple[str, ...] = ()  # accepted as is though not plain words: the job's shell reads them ($TMPDIR)
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", re.compile(self.regex))

    def accepts(self, value: object) -> bool:
        return (
            isinstance(value, str)
            and self.pattern.match(value) is not None
            and (self.max_length is None or len(value) <= self.max_length)
        )

    def check(self, value: str, what: str) -> str:
        """The value itself when the list accepts it; else UnsafeValue naming what it was meant to be."""
        if not self.accepts(value):
            limit = f" (at most {self.max_length} characters)" if self.max_length else ""
            raise UnsafeValue(f"not a valid {what}: {value!r}. {self.message}{limit}")
        return value


# What the admin names in the catalog.
SLUG = AllowList(
    r"^[a-z0-9][a-z0-9_.-]*\Z", "Use lowercase letters, digits, '.', '_' and '-', starting with a letter or digit."
)
# Partitions, clusters, GRES types, node features, QOS: Slurm's own names. 64 is the portal's limit (its columns).
SLURM_NAME = AllowList(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z", "Slurm names use letters, digits, '.', '_' and '-' only.", max_length=64
)
# Empty: no --account at all (the user's default account).
SLURM_ACCOUNT = AllowList(
    r"^[A-Za-z0-9_.-]*\Z", "Slurm accounts use letters, digits, '.', '_' and '-' only.", max_length=64
)
# A Unix group or Slurm account whose members share sessions (getent group NAME, sacctmgr account=NAME).
GROUP_NAME = AllowList(
    r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z", "a group or account name: letters, digits, _ . -", max_length=64
)
# The cluster user an account logs in as, as useradd takes it; the SSH login and squeue --user= get it.
UNIX_USERNAME = AllowList(
    r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z", "A cluster user name: letters, digits, '_', '.' and '-' (at most 32)."
)
HOSTNAME = AllowList(
    r"^(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z",
    "Enter a host name such as login.cluster.example.edu or an IPv4 address.",
)
# An IPv6 address as Slurm may report a node's (NodeAddr): hexadecimal digits, ':' and '.' (an IPv4 tail) only, so no
# zone id; network_host() checks that it is one.
IPV6_ADDRESS = AllowList(r"^[0-9A-Fa-f:.]{2,45}\Z", "Enter an IPv6 address such as fd00::5.")
MODEL_NAME = AllowList(
    r"^[A-Za-z0-9][A-Za-z0-9_.+-]*\Z", "Model names use letters, digits, '.', '_', '+' and '-' (no spaces)."
)
# A model as an API caller names it (a service's or catalog name, an alias, a uuid, owner/alias, NAME:QUANT): what a
# scoped API token may hold (jobs/models/tokens.py). Never reaches a shell; kept here with the other allow-lists.
CALLER_MODEL_NAME = AllowList(
    r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]*\Z", "A model's name uses letters, digits and '. _ : / @ + -'.", max_length=200
)
ABSOLUTE_PATH = AllowList(
    r"^/[A-Za-z0-9_.+@/-]*\Z", "Use an absolute path of letters, digits and '_ . + @ / -' (no spaces or quotes)."
)
# One entry of a directory the catalog scans: what may be joined onto an absolute path and stay one.
FILE_NAME = AllowList(r"^[A-Za-z0-9_.+@-]+\Z", "Use letters, digits and '_ . + @ -' only (no spaces or quotes).")
COMMAND_OR_PATH = AllowList(
    r"^[A-Za-z0-9_.+@/-]+\Z", "Use a command name or path of letters, digits and '_ . + @ / -' (no spaces or quotes)."
)
OLLAMA_TAG = AllowList(
    r"^[a-z0-9][a-z0-9._/-]*(?::[A-Za-z0-9][A-Za-z0-9._-]*)?\Z",
    "Use an ollama tag such as llama3.1:8b-instruct-q4_K_M.",
)
MODULE_NAME = AllowList(r"^[A-Za-z0-9][A-Za-z0-9_.+/-]*\Z", "Module names use letters, digits and '_ . + / -' only.")
COMPUTE_CAPABILITY = AllowList(
    r"^(?:[0-9]{1,2}\.[0-9]{1,2}|gfx[0-9a-f]{3,5})\Z",
    "Use a CUDA compute capability such as 8.0, or an AMD gfx target.",
)
# Where staging copies the weights: the job's $TMPDIR (the job script resolves it on the node) or an absolute path.
STAGE_TARGET = AllowList(
    r"^(?:\$TMPDIR|/[A-Za-z0-9_.+@/-]*)\Z",
    "Use $TMPDIR, /dev/shm or another absolute path of letters, digits and '_ . + @ / -'.",
    expands=("$TMPDIR",),
)
TAG = AllowList(r"^[a-z0-9][a-z0-9-]*\Z", "Tags use lowercase letters, digits and '-'.")
# A fine-tune run's suffix: a part of its adapter's model name (ft:<base>:<user>:<suffix>:<id>), which its job's values
# carry.
ADAPTER_SUFFIX = AllowList(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z", "A suffix uses letters, digits, '.', '_' and '-' only.", max_length=40
)

# What the portal names itself: a session's or batch run's id (a uuid4's text), a Slurm job id (an array task's
# too), an upload's checksum.
UUID = AllowList(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z", "Use a lowercase uuid such as the portal makes."
)
JOB_ID = AllowList(r"^[0-9]+(?:_[0-9]+)?\Z", "A Slurm job id is digits, an array task's JOB_TASK.")
SHA256 = AllowList(r"^[0-9a-f]{64}\Z", "A SHA-256 checksum is 64 lowercase hexadecimal digits.")
# A session's API key, as jobs.models.sessions makes it (and a requeued job makes a new one).
SESSION_KEY = AllowList(r"^sk-hpcllm-[A-Za-z0-9_-]{20,100}\Z", "A session key is sk-hpcllm- and 20 to 100 letters.")
# What one word of a request to a restricted key's gate may hold at all (portal/gate.py); each argument is then
# checked by its verb's own list.
GATE_WORD = AllowList(r"^[A-Za-z0-9_.:/@+,=%-]{1,4096}\Z", "The gate takes words of letters, digits and _.:/@+,=%-.")
# The arguments of the portal's own commands on a cluster (portal/gate.py's verbs), besides the lists above.
COUNT = AllowList(r"^[0-9]{1,9}\Z", "A count is digits.")
FLAG = AllowList(r"^[01]\Z", "A flag is 0 or 1.")


def inner(allowed: AllowList) -> str:
    """A list's pattern without its anchors, to sit inside a larger one (one definition of a uuid, a job id...)."""
    return allowed.regex.removeprefix("^").removesuffix("\\Z")


POLL_PAIR = AllowList(f"^{inner(UUID)}:(?:{inner(JOB_ID)})?\\Z", "A session's uuid, ':' and its job id (or none yet).")
WATCH_PAIR = AllowList(
    f"^{inner(UUID)}:(?:starting|running)\\Z",
    "A session's uuid, ':' and what the watch waits for (starting or running).",
)
RESULTS_KIND = AllowList(r"^(?:results|output)\Z", "results or output.")
# One of the #SBATCH flags a job script carries (jobs/cluster/jobscript.py), as `sbatch --test-only` gets them.
SBATCH_FLAG = AllowList(
    r"^--(?:partition|account|nodes|ntasks-per-node|cpus-per-task|mem|gres|constraint|time|exclusive)"
    r"=[A-Za-z0-9_.:-]{1,100}\Z",
    "An #SBATCH flag of the portal's job scripts, such as --partition=gpu.",
)
# A path the catalog may read a model's files at (its size, the first bytes of a GGUF, a folder's entries): absolute,
# and no part hidden but .cache (Hugging Face's cache), so a restricted key cannot be asked for ~/.ssh or the like.
MODEL_READ_PATH = AllowList(
    r"^(?:/(?:\.cache|[A-Za-z0-9_+@-][A-Za-z0-9_.+@-]*))*/?\Z",
    "Use an absolute path of letters, digits and '_ . + @ -' whose parts do not start with '.' (but .cache).",
)
GROUP_KIND = AllowList(r"^(?:unix_group|slurm_account)\Z", "unix_group or slurm_account.")


def network_host(value: object) -> bool:
    """A host name or an IP address literal: what a URL's host may be (a model server's, as a job reports it and
    Slurm names its nodes). Never anything that carries a port, a path, user info, a query or a fragment of its own
    (no '/', '?', '#' or '@'; ':' only inside an IPv6 address, which a URL then puts in brackets)."""
    if HOSTNAME.accepts(value):
        return True
    if not IPV6_ADDRESS.accepts(value):
        return False
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return True


def split_flags(value: str) -> list[str]:
    """A runtime's extra flags as the words a job script passes on: split as a shell would, then each word quoted
    again when the script is rendered. Raises UnsafeValue for what cannot split, and for newlines and NUL bytes,
    which no server flag needs and a job script must not get."""
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise UnsafeValue(f"Cannot split these flags like a shell would: {exc}.") from None
    if any("\n" in word or "\x00" in word for word in words):
        raise UnsafeValue("Flags must not contain newlines or NUL bytes.")
    return words
