"""A fine-tune run's progress as the poll read it from the trainer's progress file (jobs/cluster/scripts/finetune.py).

The file is written by a job its owner controls: hostile input. It is read bounded (the poll's head -c, in a frame its
content cannot forge), and here each value is checked for its type and range before it is kept; anything else is
dropped, and nothing of it is trusted for more than a number on a page: not a state the run could not be in, not a
step past the planned ones, not text but library versions and file names of a fixed shape. Plain Python.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

STATES = ("running", "stopped", "completed")
PRECISIONS = ("bf16", "fp16", "fp32")
DEVICES = ("cuda", "cpu")
LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes")
MAX_POINTS = 250
MAX_LOSS = 1e6
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,39}")
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class Report:
    state: str
    step: int
    epoch: float = 0.0
    train_loss: float | None = None
    valid_loss: float | None = None
    base_valid_loss: float | None = None  # before training: the base model's (the trainer's step 0)
    tokens_per_s: float = 0.0
    peak_memory_gib: float | None = None
    precision: str = ""
    device: str = ""
    restarts: int = 0
    resumed_from: int | None = None
    points: list[list[Any]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)


def _float(value: Any, high: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0 <= value <= high else None


def _int(value: Any, high: int) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high else None


def _one_of(value: Any, allowed: tuple[str, ...]) -> str:
    return value if isinstance(value, str) and value in allowed else ""


def _name(text: str) -> bool:
    return bool(_FILE.fullmatch(text))


def _points(value: Any, planned: int) -> list[list[Any]]:
    """The loss curve: [step, training loss, validation loss] with the steps rising, the losses numbers or null."""
    if not isinstance(value, list):
        return []
    points: list[list[Any]] = []
    for item in value[:MAX_POINTS]:
        if not isinstance(item, list) or len(item) != 3:
            continue
        step = _int(item[0], planned)
        train, valid = _float(item[1], MAX_LOSS), _float(item[2], MAX_LOSS)
        if not step or (points and step <= points[-1][0]) or (train is None and valid is None):
            continue
        points.append([step, train, valid])
    return points


def _result(value: Any, planned: int) -> dict[str, Any]:
    """The adapter's record, once the trainer finished: its final losses, steps, libraries, precision, files."""
    if not isinstance(value, dict):
        return {}
    versions = value.get("versions")
    files = value.get("files")
    return {
        "train_loss": _float(value.get("train_loss"), MAX_LOSS),
        "valid_loss": _float(value.get("valid_loss"), MAX_LOSS),
        "steps": _int(value.get("steps"), planned),
        "tokens": _int(value.get("tokens"), 10**15),
        "versions": {
            name: version
            for name, version in (versions.items() if isinstance(versions, dict) else [])
            if name in LIBRARIES and isinstance(version, str) and _VERSION.fullmatch(version)
        },
        "precision": _one_of(value.get("precision"), PRECISIONS),
        "device": _one_of(value.get("device"), DEVICES),
        "files": [f for f in (files if isinstance(files, list) else [])[:20] if isinstance(f, str) and _name(f)],
    }


def clean(raw: Any, planned: int) -> Report | None:
    """The report, checked; None when it is not one the trainer writes (no state, no step, a step past the plan)."""
    if not isinstance(raw, dict) or raw.get("state") not in STATES:
        return None
    step = _int(raw.get("step"), planned)
    if step is None:
        return None
    resumed = _int(raw.get("resumed_from"), step)
    return Report(
        state=raw["state"],
        step=step,
        epoch=_float(raw.get("epoch"), 1e6) or 0.0,
        train_loss=_float(raw.get("train_loss"), MAX_LOSS),
        valid_loss=_float(raw.get("valid_loss"), MAX_LOSS),
        base_valid_loss=_float(raw.get("base_valid_loss"), MAX_LOSS),
        tokens_per_s=_float(raw.get("tokens_per_s"), 1e9) or 0.0,
        peak_memory_gib=_float(raw.get("peak_memory_gib"), 1e5),
        precision=_one_of(raw.get("precision"), PRECISIONS),
        device=_one_of(raw.get("device"), DEVICES),
        restarts=_int(raw.get("restarts"), 10_000) or 0,
        resumed_from=resumed or None,
        points=_points(raw.get("points"), planned),
        result=_result(raw.get("result"), planned) if raw["state"] == "completed" else {},
    )


def run_fields(report: Report) -> dict[str, Any]:
    """What a run keeps of a report (FineTuneRun's columns)."""
    fields: dict[str, Any] = {
        "step": report.step,
        "epoch": report.epoch,
        "train_loss": report.train_loss,
        "valid_loss": report.valid_loss,
        "tokens_per_s": report.tokens_per_s,
        "peak_memory_gib": report.peak_memory_gib,
        "restarts": report.restarts,
        "resumed_from_step": report.resumed_from,
        "losses": report.points,
    }
    if report.base_valid_loss is not None:  # a report without it (an older trainer's) keeps what was measured
        fields["base_valid_loss"] = report.base_valid_loss
    if report.result:
        fields["result"] = {**report.result, "precision": report.result["precision"] or report.precision}
    return fields
