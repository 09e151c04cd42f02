"""A batch run's state changes through transition_run() alone: the moves it allows, the event each change leaves, the
writer that loses a race, the writers that go through it (the poll, a failed staging, a session that ended first),
and a check of the code that nothing else writes the state."""

from __future__ import annotations

import ast
import uuid
from pathlib import Path

import pytest

from jobs.batch import progress, staging
from jobs.models import BatchEvent, BatchRun, State, transition, transition_run
from jobs.models import batch as batch_models

pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parents[3]
WAITING, RUNNING, FINISHED, STOPPED, FAILED = BatchRun.State


def moves(run: BatchRun) -> list[tuple[str, str]]:
    return list(BatchEvent.objects.filter(run=run).values_list("from_state", "to_state"))


def test_a_new_run_starts_its_history_waiting(run: BatchRun) -> None:
    event = BatchEvent.objects.get(run=run)
    assert (event.from_state, event.to_state) == ("", WAITING)
    assert event.reason == "a batch launch of 3 prompts from p.txt"


def test_each_change_of_state_is_one_event_and_a_move_in_place_updates_fields_only(run: BatchRun) -> None:
    assert transition_run(run.pk, RUNNING, reason="the runner is sending the prompts")
    assert transition_run(run.pk, RUNNING, reason="counts", done=2)  # same state: the counts, no event
    assert transition_run(run.pk, FINISHED, reason="the runner answered every prompt", done=3)
    run.refresh_from_db()
    assert (run.state, run.done) == (FINISHED, 3) and run.finished_at is not None
    assert moves(run) == [("", WAITING), (WAITING, RUNNING), (RUNNING, FINISHED)]
    reasons = list(BatchEvent.objects.filter(run=run).values_list("reason", flat=True))
    assert reasons[-1] == "the runner answered every prompt"


def test_a_runner_that_stopped_with_its_job_sends_the_run_back_to_waiting(run: BatchRun) -> None:
    assert transition_run(run.pk, RUNNING, reason="running")
    assert transition_run(run.pk, WAITING, reason="requeued")
    assert moves(run)[-1] == (RUNNING, WAITING)


@pytest.mark.parametrize("end", [FINISHED, STOPPED, FAILED])
def test_an_ended_run_stays_ended(run: BatchRun, end: BatchRun.State) -> None:
    assert transition_run(run.pk, end, reason="the end", end_reason="the end")
    for state in BatchRun.State:
        assert not transition_run(run.pk, state, reason="too late", end_reason="overwritten")
    run.refresh_from_db()
    assert (run.state, run.end_reason) == (end, "the end")
    assert moves(run) == [("", WAITING), (WAITING, end)]


def test_moves_out_of_an_end_state_or_around_the_function_are_refused_outright(run: BatchRun) -> None:
    with pytest.raises(ValueError, match="stays ended"):
        transition_run(run.pk, RUNNING, reason="revive", allowed_from={FINISHED})
    with pytest.raises(TypeError):
        transition_run(run.pk, RUNNING, reason="two states", state=FAILED)
    run.refresh_from_db()
    assert run.state == WAITING


def test_allowed_from_narrows_the_move_to_the_states_the_caller_expects(run: BatchRun) -> None:
    assert not transition_run(run.pk, FAILED, reason="only while running", allowed_from={RUNNING})
    assert transition_run(run.pk, FAILED, reason="while waiting", allowed_from={WAITING})
    assert moves(run) == [("", WAITING), (WAITING, FAILED)]


def test_a_run_that_is_not_there_moves_nowhere() -> None:
    assert not transition_run(uuid.uuid4(), FAILED, reason="gone")
    assert not BatchEvent.objects.exists()


def test_of_two_writers_racing_the_one_whose_update_finds_the_state_changed_loses(
    run: BatchRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second writer read the run while it was running; the first stopped it before the second's UPDATE ran.
    The UPDATE is conditional on the state read, so the second changes nothing and records nothing."""
    assert transition_run(run.pk, RUNNING, reason="running")
    assert transition_run(run.pk, STOPPED, reason="stopped at your request", end_reason="stopped at your request")
    monkeypatch.setattr(batch_models, "_state_of", lambda run_id: RUNNING)  # what the slower writer had read
    assert not transition_run(run.pk, FAILED, reason="the job gave the run up", end_reason="gave up")
    run.refresh_from_db()
    assert (run.state, run.end_reason) == (STOPPED, "stopped at your request")
    assert moves(run) == [("", WAITING), (WAITING, RUNNING), (RUNNING, STOPPED)]


def test_the_poll_leaves_an_event_for_each_change_it_reads_and_none_for_counts(run: BatchRun) -> None:
    sessions = [str(run.session_id)]
    progress.apply(sessions, {str(run.pk): {"state": "running", "done": 1}})
    progress.apply(sessions, {str(run.pk): {"state": "running", "done": 2}})
    assert progress.apply(sessions, {str(run.pk): {"state": "finished", "done": 3}}) == [str(run.pk)]
    assert progress.apply(sessions, {str(run.pk): {"state": "finished", "done": 3}}) == []  # ended once
    assert moves(run) == [("", WAITING), (WAITING, RUNNING), (RUNNING, FINISHED)]
    assert [e.reason for e in BatchEvent.objects.filter(run=run)][1:] == [
        "the runner is sending the prompts",
        "the runner answered every prompt",
    ]


def test_a_failed_staging_and_an_ended_session_end_the_run_with_their_reason(run: BatchRun) -> None:
    staging.fail(str(run.pk), "could not send the run to the cluster: no such directory")
    assert BatchEvent.objects.get(run=run, to_state=FAILED).reason.endswith("no such directory")
    other = BatchRun.objects.get(pk=run.pk)
    other.pk = None  # a second run on the same session, still waiting
    other.state = WAITING
    other.save()
    transition(run.session_id, State.CANCELLED, cause="test", end_reason="cancelled from the portal")
    assert progress.runs_of_ended_sessions() == [str(other.pk)]
    assert moves(other) == [(WAITING, STOPPED)]
    assert "cancelled from the portal" in BatchEvent.objects.get(run=other, to_state=STOPPED).reason


# The check of the code: what writes a run's state, found in the syntax tree.

WRITES = {"update", "create", "get_or_create", "update_or_create", "bulk_create", "bulk_update"}
# Calls that change rows that exist: **fields there may hold a state. A new run (create, BatchRun(...)) starts where its
# first event says, so only an explicit state= counts there.
CHANGES = {"update", "update_or_create"}
THE_FUNCTION = ("jobs/models/batch.py", "transition_run")


def _names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def _about_runs(node: ast.AST, assigned: dict[str, list[ast.AST]], depth: int = 0) -> bool:
    """Whether an expression is (or was assigned from) something of BatchRun's: its manager, a queryset of it, a
    session's batch_runs."""
    names = _names_in(node)
    if names & {"BatchRun", "batch_runs"}:
        return True
    return depth < 3 and any(_about_runs(v, assigned, depth + 1) for n in names for v in assigned.get(n, []))


def _own_nodes(body: ast.AST) -> list[ast.AST]:
    """The nodes of a module or function body, without those of the functions defined in it (visited on their
    own, so that each write is found once, in the function it is in)."""
    found, stack = [], list(ast.iter_child_nodes(body))
    while stack:
        node = stack.pop()
        found.append(node)
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            stack.extend(ast.iter_child_nodes(node))
    return found


def state_writes(source: str) -> list[tuple[int, str | None]]:
    """Lines that write a BatchRun's state, each with the function it is in: a manager or queryset call given
    state= (an update also **fields, which may hold it), the model built with state=, an assignment to a run's
    .state, setattr(run, "state", ...), and SQL that updates the table."""
    found: list[tuple[int, str | None]] = []

    def visit(body: ast.AST, function: str | None) -> None:
        assigned: dict[str, list[ast.AST]] = {}
        nodes = list(_own_nodes(body))
        for node in nodes:
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        assigned.setdefault(target.id, []).append(node.value)
            elif isinstance(node, ast.For) and isinstance(node.target, ast.Name):
                assigned.setdefault(node.target.id, []).append(node.iter)
        for node in nodes:
            if isinstance(node, ast.Call):
                keywords = {k.arg for k in node.keywords}
                func = node.func
                if isinstance(func, ast.Attribute) and func.attr in WRITES and _about_runs(func.value, assigned):
                    listed = any(isinstance(a, ast.Constant) and a.value == "state" for a in ast.walk(node))
                    changes = (func.attr in CHANGES and None in keywords) or (func.attr == "bulk_update" and listed)
                    if "state" in keywords or changes:
                        found.append((node.lineno, function))
                elif isinstance(func, ast.Name) and func.id == "BatchRun" and "state" in keywords:
                    found.append((node.lineno, function))
                elif isinstance(func, ast.Name) and func.id == "setattr" and len(node.args) >= 2:
                    name = node.args[1]
                    if isinstance(name, ast.Constant) and name.value == "state" and _about_runs(node.args[0], assigned):
                        found.append((node.lineno, function))
            elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Attribute) and target.attr == "state":
                        owner = target.value
                        named = isinstance(owner, ast.Name) and "run" in owner.id.lower()
                        if named or _about_runs(owner, assigned):
                            found.append((node.lineno, function))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value.lower()
                if "jobs_batchrun" in text and "update" in text:
                    found.append((node.lineno, function))

    tree = ast.parse(source)
    visit(tree, None)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            visit(node, node.name)
    return sorted(set(found), key=lambda found: (found[0], found[1] or ""))


def test_the_check_finds_every_kind_of_state_write() -> None:
    source = """
def views(session, fields):
    BatchRun.objects.filter(pk=1).update(state="failed")
    runs = BatchRun.objects.filter(session=session)
    runs.update(**fields)
    session.batch_runs.update(state="stopped")
    BatchRun.objects.bulk_update([], ["state"])
    BatchRun(name="x", state="running").save()
    BatchRun(name="y", **fields).save()
    for run in runs:
        run.state = "finished"
    setattr(runs.first(), "state", "failed")
    connection.cursor().execute("UPDATE jobs_batchrun SET state = 'failed'")
    BatchRun.objects.filter(pk=1).update(staged_at=None)
    session.state = "running"
"""
    assert [line for line, _ in state_writes(source)] == [3, 5, 6, 7, 8, 11, 12, 13]


def test_nothing_but_transition_run_writes_a_batch_runs_state() -> None:
    outside = []
    inside = 0
    for app in ("portal", "catalog", "jobs"):
        for path in sorted((REPO / app).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            relative = str(path.relative_to(REPO))
            for line, function in state_writes(path.read_text()):
                if (relative, function) == THE_FUNCTION:
                    inside += 1
                else:
                    outside.append(f"{relative}:{line}")
    assert not outside, f"write a BatchRun's state through jobs.models.transition_run: {outside}"
    assert inside == 1  # the check sees the one write there is, so it would see another
