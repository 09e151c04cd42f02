"""What the trainer writes is hostile input: only numbers in range, states it can be in and text of fixed shapes are
kept; anything else is dropped, and a file that is not a report is none."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from jobs.cluster import remote
from jobs.finetune import progress

GOOD = {
    "state": "completed", "step": 10, "planned_steps": 10, "epoch": 2.0, "train_loss": 1.25, "valid_loss": 1.5,
    "tokens_per_s": 320.5, "peak_memory_gib": 1.4, "precision": "fp32", "device": "cpu", "restarts": 1,
    "resumed_from": 6, "points": [[1, 3.0, None], [5, 2.0, 2.5], [10, 1.25, 1.5]],
    "result": {"train_loss": 1.25, "valid_loss": 1.5, "steps": 10, "tokens": 4321, "precision": "fp32",
               "device": "cpu", "versions": {"torch": "2.13.0+cpu", "peft": "0.22.0"},
               "files": ["adapter_config.json"]},
}  # fmt: skip


def test_a_trainers_report_is_read_whole() -> None:
    report = progress.clean(GOOD, planned=10)
    assert report is not None
    assert (report.state, report.step, report.train_loss, report.resumed_from) == ("completed", 10, 1.25, 6)
    assert report.points == [[1, 3.0, None], [5, 2.0, 2.5], [10, 1.25, 1.5]]
    assert report.result["versions"] == {"torch": "2.13.0+cpu", "peft": "0.22.0"}
    fields = progress.run_fields(report)
    assert fields["step"] == 10 and fields["result"]["steps"] == 10 and fields["losses"] == report.points
    assert fields["result"]["tokens"] == 4321  # the job's trained_tokens in the fine-tuning API
    assert progress.clean({**GOOD, "result": {"tokens": -1}}, 10).result["tokens"] is None  # type: ignore[union-attr]


def test_garbage_is_refused_or_dropped_value_by_value() -> None:
    assert progress.clean({"state": "pwned", "step": 1}, planned=10) is None
    assert progress.clean({**GOOD, "step": 11}, planned=10) is None  # past the plan
    assert progress.clean({**GOOD, "step": True}, planned=10) is None
    assert progress.clean(["state"], planned=10) is None
    hostile: dict[str, Any] = {
        **GOOD,
        "state": "running",
        "train_loss": float("nan"),
        "valid_loss": -1,
        "tokens_per_s": "fast",
        "precision": "<script>",
        "points": [[2, 1.0, None], [1, 2.0, None], ["3", 1.0, None], [4, None, None], [99, 1.0, None], "x"],
        "result": {"versions": {"torch": "1\n2"}},
    }
    report = progress.clean(hostile, planned=10)
    assert report is not None
    assert (report.train_loss, report.valid_loss, report.tokens_per_s, report.precision) == (None, None, 0.0, "")
    assert report.points == [[2, 1.0, None]]  # steps must rise, be numbers within the plan, and carry a loss
    assert report.result == {}  # only a completed report has one
    completed = progress.clean({**GOOD, "result": {"versions": {"torch": "1\n2", "evil": "1"}, "files": ["../x"]}}, 10)
    assert completed is not None and completed.result["versions"] == {} and completed.result["files"] == []


@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
                    max_leaves=30))  # fmt: skip
def test_any_json_is_a_checked_report_or_none(raw: Any) -> None:
    report = progress.clean(raw, planned=50)
    if report is not None:
        assert 0 <= report.step <= 50 and report.state in progress.STATES
        json.dumps(progress.run_fields(report), allow_nan=False)  # only finite numbers reach the database


def test_the_poll_reads_a_runs_progress_only_from_its_own_frame() -> None:
    import base64

    frame = "0" * 32
    body = base64.b64encode(json.dumps(GOOD).encode()).decode()
    run = "3f1c8a52-8d64-4c4a-9a0b-6d3c2d1e0f00"
    text = (
        f"@@{frame} squeue 0 \n@@{frame} training {run} {body}\n@@{'1' * 32} training {run} {body}\n"
        f"@@{frame} training not-a-uuid {body}\n@@{frame} end \n"
    )
    polled = remote.parse_poll(text, frame)
    assert list(polled.training) == [run] and polled.training[run]["step"] == 10
