"""squeue's rows (portal/slurm/squeue.py): the portal's format, whatever a job is named, and the pending demand."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from portal.slurm.jobstates import ACTIVE_STATES, FINISHED_STATES, PENDING_STATES, base_state
from portal.slurm.squeue import parse_pending_demand, parse_squeue
from portal.slurm.times import format_duration


def test_squeue_lines_parse_into_jobs_and_bad_lines_are_reported_not_dropped() -> None:
    text = (
        "37|waiter|PENDING|Resources|N/A||0:00|1:00:00|gpu|2\n"
        "36|hold|RUNNING|None|2026-11-21T12:29:07|node[1-2]|0:01|59:59|gpu|2\n"
        "slurm_load_jobs error: Socket timed out on send/recv operation\n"
    )
    jobs, bad = parse_squeue(text)
    assert [j.job_id for j in jobs] == ["37", "36"]
    pending, running = jobs
    assert (pending.state, pending.reason, pending.start_time, pending.nodes) == ("PENDING", "Resources", None, [])
    assert running.start_time == datetime(2026, 11, 21, 12, 29, 7)
    assert running.nodes == ["node1", "node2"]
    assert (running.time_used_s, running.time_left_s, running.reason) == (1, 3599, "")
    assert bad == ["slurm_load_jobs error: Socket timed out on send/recv operation"]


def test_the_cluster_line_of_a_query_with_clusters_is_skipped_not_reported() -> None:
    text = "CLUSTER: c2\n101|hpcllm-x|RUNNING|None|2026-11-21T12:00:00|node1|1:00|59:00|gpu|1\n"
    jobs, bad = parse_squeue(text)
    assert [job.job_id for job in jobs] == ["101"] and bad == []


def test_array_tasks_and_states_with_flags_are_read() -> None:
    jobs, bad = parse_squeue("55_3|x|CANCELLED by 1001|None|N/A||0:00|0:00|gpu|1\n")
    assert bad == [] and (jobs[0].job_id, jobs[0].state) == ("55_3", "CANCELLED")
    assert base_state("CANCELLED by 1001") == "CANCELLED" and base_state(" ") == ""


def test_pending_demand_multiplies_gpus_per_node_by_nodes() -> None:
    demand = parse_pending_demand("gpu|gres:gpu:a100:2|3\ngpu,devel|gres/gpu:h100:1|1\ngpu|N/A|1\n")
    assert demand["gpu"].jobs == 3 and demand["gpu"].gpus == {"a100": 6, "h100": 1}
    assert demand["devel"].jobs == 1


SAFE = st.text(alphabet=st.characters(exclude_characters="|\n\r", exclude_categories=["Cs"]), max_size=20)
TIMES = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31)).map(
    lambda d: d.replace(microsecond=0)
)


@given(
    st.lists(
        st.tuples(
            st.integers(1, 10**9),
            SAFE,
            st.sampled_from(sorted(PENDING_STATES | ACTIVE_STATES | FINISHED_STATES)),
            st.from_regex(r"[A-Za-z]{1,20}", fullmatch=True),
            st.none() | TIMES,
            st.integers(0, 10**7),
            st.integers(1, 64),
        ),
        max_size=20,
    )
)
def test_squeue_round_trips_whatever_the_job_names(rows: list[Any]) -> None:
    lines = []
    for job_id, name, state, reason, start, used, count in rows:
        start_text = start.strftime("%Y-%m-%dT%H:%M:%S") if start else "N/A"
        lines.append(
            f"{job_id}|{name}|{state}|{reason}|{start_text}|n[1-{count}]|{format_duration(used)}|UNLIMITED|gpu|{count}"
        )
    jobs, bad = parse_squeue("\n".join(lines))
    assert bad == []
    assert [(j.job_id, j.name, j.state, j.start_time, j.time_used_s, len(j.nodes)) for j in jobs] == [
        (str(job_id), name, state, start, used, count) for job_id, name, state, _, start, used, count in rows
    ]


@given(st.text(max_size=300))
def test_any_text_is_jobs_or_bad_lines_never_an_error(text: str) -> None:
    jobs, bad = parse_squeue(text)
    assert len(jobs) + len(bad) <= text.count("\n") + 1
    parse_pending_demand(text)
