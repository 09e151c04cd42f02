"""The layout docs/architecture.md draws, checked on the code: imports run one way and never in a circle, and no
module is named like the standard library."""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
APPS = ("portal", "catalog", "jobs")
# The project's wiring sits above both apps; the rest of portal is infrastructure they share.
WIRING = {"portal.urls", "portal.asgi", "portal.wsgi", "portal.celery"}
# jobs' subpackages that act (everything but the models and the allocations, which only read the models).
ACTING = ("jobs.cluster", "jobs.sessions", "jobs.use", "jobs.batch", "jobs.usage", "jobs.operations", "jobs.tasks",
          "jobs.services", "jobs.finetune")  # fmt: skip
# Who may import whom, as package prefixes: a module under the key may not import one under any listed prefix.
FORBIDDEN = {
    "portal": ("catalog", "jobs"),
    "catalog": ("jobs",),
    "jobs.models": (*ACTING, "jobs.allocations"),
    # Allocations sit below everything that asks them (the launch, the proxy's door, the usage pages, the metrics):
    # they read only the models.
    "jobs.allocations": ACTING,
    "jobs.cluster": (
        "jobs.sessions",
        "jobs.use",
        "jobs.batch",
        "jobs.usage",
        "jobs.tasks",
        "jobs.services",
        "jobs.finetune",
    ),
    "jobs.sessions": ("jobs.use", "jobs.batch", "jobs.services", "jobs.finetune"),
    # Fine-tune runs sit above the sessions and batch runs: a run takes the launch's fields and checks, and its data is
    # read with the prompts files' line reader; nothing below imports them.
    "jobs.finetune": ("jobs.use", "jobs.services"),
    # Model services sit above the sessions (a replica is a session launched and cancelled through their actions)
    # and below the proxy, which routes a request naming a service to one of its replicas.
    "jobs.services": ("jobs.use", "jobs.batch"),
    # Batch runs sit above the sessions: a batch launch is a launch with its run added, a run is seen through its
    # session's access rule, and the runs' progress is recorded from what the sessions' poll read (by its caller,
    # the tasks). The OpenAI Batch API (jobs.use) is above them.
    "jobs.batch": ("jobs.use", "jobs.finetune"),
    # The proxy's meter feeds the operators' metrics (usage -> operations); the sessions' pages and the proxy read
    # the usage figures (sessions, use -> usage). The "Site usage" permission both check lives in jobs.models.
    "jobs.usage": ("jobs.sessions", "jobs.use", "jobs.batch", "jobs.finetune"),
    "jobs.operations": ("jobs.usage", "jobs.sessions", "jobs.use", "jobs.batch", "jobs.finetune"),
}
# Only these modules enqueue Celery tasks by importing jobs.tasks (besides the URL and command entry points).
ENQUEUE = {"jobs.sessions.actions", "jobs.batch.actions", "jobs.services.actions", "jobs.finetune.actions"}


def modules() -> dict[str, Path]:
    found = {}
    for app in APPS:
        for path in (REPO / app).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            rel = path.relative_to(REPO).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found[".".join(parts)] = path
    return found


def imports() -> dict[str, set[str]]:
    """Each project module and the project modules it imports, lazily or not."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in names:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


GRAPH = imports()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_run_one_way(module: str) -> None:
    holding = [prefix for prefix in FORBIDDEN if module == prefix or module.startswith(prefix + ".")]
    if holding and module not in WIRING:
        forbidden = [f for prefix in holding for f in FORBIDDEN[prefix]]
        wrong = [t for t in GRAPH[module] if any(t == f or t.startswith(f + ".") for f in forbidden)]
        assert not wrong, f"{module} imports {wrong}"
    if "jobs.tasks" in GRAPH[module]:
        assert module in ENQUEUE or module.startswith(("jobs.management", "jobs.urls")), module


def test_no_import_cycles() -> None:
    """No module reaches itself through its imports (a package's own __init__ aside)."""
    cycles = []
    for start in GRAPH:
        seen, stack = set(), [start]
        while stack:
            for target in GRAPH[stack.pop()]:
                if target == start and not start.startswith(f"{target}."):
                    cycles.append(start)
                if target not in seen and not start.startswith(f"{target}."):
                    seen.add(target)
                    stack.append(target)
    assert not cycles, f"import cycles through: {sorted(set(cycles))}"


def subpackage(module: str) -> str | None:
    """The jobs subpackage (a folder: jobs.models, jobs.sessions, ...) a module belongs to; None for the rest."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "jobs" or not (REPO / "jobs" / parts[1]).is_dir():
        return None
    return ".".join(parts[:2])


def test_no_two_jobs_subpackages_import_each_other_in_a_cycle() -> None:
    """At the package level too, lazy imports included: jobs.usage importing jobs.operations while jobs.operations
    imports jobs.usage is a cycle even when no single module reaches itself. (jobs.tasks is a module, not a
    subpackage: the actions modules enqueueing its tasks, ENQUEUE, are the one allowed way back.)"""
    packages: dict[str, set[str]] = defaultdict(set)
    for module, targets in GRAPH.items():
        source = subpackage(module)
        if source is None:
            continue
        packages[source] |= {t for t in map(subpackage, targets) if t is not None and t != source}
    cycles = []
    for start in sorted(packages):
        paths = [[start]]
        seen = {start}
        while paths:
            path = paths.pop()
            for target in sorted(packages[path[-1]]):
                if target == start:
                    cycles.append(" -> ".join([*path, start]))
                elif target not in seen:
                    seen.add(target)
                    paths.append([*path, target])
    assert not cycles, "subpackages in a cycle: " + "; ".join(cycles)


def test_no_module_is_named_like_the_standard_library() -> None:
    clashes = [m for m in GRAPH if "." in m and m.rpartition(".")[2] in sys.stdlib_module_names]
    assert not clashes


# ---- the cluster side ----------------------------------------------------------------------------------------------

JOB_SIDE = REPO / "jobs" / "cluster" / "scripts"
LAYOUT_MODULE = REPO / "jobs" / "cluster" / "layout.py"
MAX_SHELL_LINES = 200


def code_lines(path: Path) -> list[str]:
    """A shell file's lines without its comments (a comment may name a file; the code must not)."""
    return [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]


def test_the_session_directory_is_spelled_in_one_python_module_and_never_in_the_job_scripts() -> None:
    from jobs.cluster import layout

    spelled = [path for path in map(Path, modules().values()) if layout.PORTAL_DIR in path.read_text()]
    assert spelled == [LAYOUT_MODULE]
    in_scripts = sum(path.read_text().count(layout.PORTAL_DIR) for path in JOB_SIDE.iterdir() if path.is_file())
    assert in_scripts <= 1


def test_the_job_scripts_name_the_layouts_files_only_by_their_variables() -> None:
    """What the job writes and the portal reads has its name from jobs/cluster/layout.py alone; a name with a dot or an
    underscore cannot be a word of the shell's own, so any such name in the code is a second spelling."""
    from jobs.cluster import layout

    names = [getattr(layout.NAMES, f.name) for f in fields(layout.Names)]
    distinctive = [name for name in names if "." in name or "_" in name or name[0].isupper()]
    for path in JOB_SIDE.glob("*.sh"):
        code = "\n".join(code_lines(path))
        # As a word of a path or command (a quoted JSON key such as "job_id" is not a file).
        assert not [n for n in distinctive if re.search(rf'(?<![\w"]){re.escape(n)}(?![\w"])', code)], path.name


def test_no_job_side_shell_file_is_longer_than_one_sitting() -> None:
    long = {
        path.name: n for path in JOB_SIDE.glob("*.sh") if (n := len(path.read_text().splitlines())) > MAX_SHELL_LINES
    }
    assert not long, f"split these by concern: {long}"


def python_files() -> list[Path]:
    """The portal's Python (its apps, the job side's helpers among them) and the benchmarks'."""
    return sorted({*map(Path, modules().values()), *(REPO / "bench").rglob("*.py"), *(REPO / "scripts").rglob("*.py")})


def test_the_job_name_prefix_is_spelled_in_one_python_module_and_never_in_a_script() -> None:
    """Every script on a login host gets it as $JOB_NAME_PREFIX (jobs/cluster/remote.py's script()). Not counted:
    an API key's prefix (sk-hpcllm-) and a benchmark's scratch folder (hpcllm-bench-)."""
    from jobs.cluster import slurm

    spelling = re.compile(rf"(?<![\w-]){re.escape(slurm.JOB_NAME_PREFIX)}(?!bench-)")
    spelled = {str(p.relative_to(REPO)): n for p in python_files() if (n := len(spelling.findall(p.read_text())))}
    assert spelled == {"jobs/cluster/slurm.py": 1}
    assert not [path.name for path in JOB_SIDE.iterdir() if path.is_file() and spelling.search(path.read_text())]


# ---- Slurm's text --------------------------------------------------------------------------------------------------

HOSTLIST_MODULE = REPO / "portal" / "slurm" / "hostlist.py"
# Hostlists a second expander would be written for; a pattern that reads one matches across its first "[".
HOSTLISTS = ("node[1-3,7]", "gpu[01-02]", "rack[1-2]-n[1-2]")
BRACKET_SEARCHES = {"find", "rfind", "index", "rindex", "split", "rsplit", "partition", "rpartition"}


def hostlist_expanders(source: str) -> list[str]:
    """What in a module's source reads Slurm hostlists itself: a function named for them, a regex that matches a
    literal "[" within a hostlist (catalog/inventory.py had `([^,\\[]+)(?:\\[([^\\]]+)\\])?`), or a string searched
    or split at a bracket."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and "hostlist" in node.name.lower():
            found.append(f"line {node.lineno}: function {node.name}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and ("\\[" in node.value or "[[]" in node.value)
        ):
            try:
                pattern = re.compile(node.value)
            except re.error:
                continue
            for text in HOSTLISTS:
                match = pattern.search(text)
                if match and match.start() <= text.index("[") < match.end():
                    found.append(f"line {node.lineno}: regex {node.value!r} reads {text!r}")
                    break
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in BRACKET_SEARCHES
            and any(isinstance(arg, ast.Constant) and arg.value in ("[", "]") for arg in node.args)
        ):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_hostlists_are_expanded_by_one_module() -> None:
    """portal/slurm/hostlist.py reads them as Slurm does (tests/e2e/test_slurm_text.py compares it with scontrol);
    a second reader disagrees with it somewhere (catalog/inventory.py's own read `node[1-2]-ib`, which Slurm
    refuses, as node1, node2 and a node named "-ib")."""
    others = {
        str(path.relative_to(REPO)): found
        for path in python_files()
        if path != HOSTLIST_MODULE and (found := hostlist_expanders(path.read_text()))
    }
    assert not others, f"expand hostlists with portal.slurm.hostlist.expand_hostlist instead: {others}"


def test_the_hostlist_check_sees_the_expanders_it_forbids() -> None:
    assert hostlist_expanders(HOSTLIST_MODULE.read_text())  # the one expander: a copy of it would be seen too
    old_inventory = 'import re\n_HOSTLIST_PART = re.compile(r"([^,\\[]+)(?:\\[([^\\]]+)\\])?")\n'
    assert hostlist_expanders(old_inventory) == [
        "line 2: regex '([^,\\\\[]+)(?:\\\\[([^\\\\]]+)\\\\])?' reads 'node[1-3,7]'"
    ]
    assert len(hostlist_expanders("def nodes_of(hostlist):\n    head, _, rest = hostlist.partition('[')\n")) == 1
    assert len(hostlist_expanders("def parse_hostlist(text):\n    return text.split(',')\n")) == 1
    assert not hostlist_expanders('import re\nOOD = re.compile(r"clusters\\[(\\d+)\\]")\n')  # not a hostlist


# ---- the tests themselves ------------------------------------------------------------------------------------------

TESTS = REPO / "tests"
# Where tests of each marker may live (a browser test may need the cluster too), and the folder whose every module
# carries the marker.
MARKED = {
    "e2e": ((TESTS / "e2e", TESTS / "browser"), TESTS / "e2e"),
    "browser": ((TESTS / "browser",), TESTS / "browser"),
}


@pytest.mark.parametrize("marker", sorted(MARKED))
def test_tests_that_need_the_cluster_or_a_browser_live_in_their_folder_and_are_marked(marker: str) -> None:
    """`make test-fast` leaves the e2e and browser tests out by their markers and runs the rest in parallel: a marked
    test elsewhere hides among the unit tests, and an unmarked one in tests/e2e would run without its cluster."""
    homes, own = MARKED[marker]
    mark = f"pytest.mark.{marker}"
    strays = [
        p.relative_to(REPO)
        for p in TESTS.rglob("test_*.py")
        if not any(home in p.parents for home in homes) and mark in p.read_text()
    ]
    assert not strays, f"move to {own.relative_to(REPO)}: {strays}"
    module_mark = re.compile(rf"^pytestmark = .*\b{re.escape(mark)}\b", re.MULTILINE)
    unmarked = [p.name for p in own.glob("test_*.py") if not module_mark.search(p.read_text())]
    assert not unmarked, f"mark each module: pytestmark = {mark}"
