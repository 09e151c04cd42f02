"""llama.cpp's compute buffer as the estimator sizes it, against llama-server 0.3.36's own figures: start-up lines
captured on CPU for SmolLM2-135M and random models from scripts/tiny-gguf, each block with the model and the command
it ran (data/llama-compute/); and the older builds behind the published rows, which reserved logits for a whole
micro-batch."""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytest

from catalog import confidence
from catalog.architecture import Architecture
from catalog.estimate import GIB, Estimate, Request, estimate, ubatch_logits_in

CAPTURED = Path(__file__).parent / "data" / "llama-compute" / "llama-server-0.3.36-cpu.log"
# SmolLM2-135M-Instruct's GGUF header (catalog.gguf.read_header of the Q4_1 file the local cluster serves).
SMOLLM2 = Architecture(0.134515, 30, 576, 9, 3, 64, 49152, 8192, ffn_size=1536, tied_embeddings=True)
TINY_DEFAULTS = {"layers": 2, "width": 64, "heads": 4, "kv-heads": 2, "ffn": 0, "vocab": 259, "sliding-window": 0}


class Run(NamedTuple):
    model: str
    arch: Architecture
    context: int  # per slot
    parallel: int
    ubatch: int
    flash: bool
    lines: str

    def logged(self, pattern: str) -> str:
        match = re.search(pattern, self.lines)
        assert match, (pattern, self.lines)
        return match.group(1)

    def request(self) -> Request:
        return Request(
            self.arch, "fp16", "llama.cpp", self.context, parallel=self.parallel, batch_tokens=self.ubatch,
            flash_attn=self.flash,
        )  # fmt: skip


def graph_note(est: Estimate) -> str:
    return next(note for note in est.notes if note.startswith("compute graph for "))


def tiny_architecture(flags: list[str]) -> Architecture:
    """The shape scripts/tiny-gguf writes for these flags: its defaults, an FFN twice the width, a byte vocabulary of
    259 tokens; gemma3 with a window lets every sixth layer attend to the whole context (llama.cpp's pattern)."""
    values = dict(TINY_DEFAULTS)
    gemma = False
    for name, value in itertools.pairwise(flags):
        if name == "--arch":
            gemma = value == "gemma3"
        elif name.startswith("--") and name[2:] in values:
            values[name[2:]] = int(value)
    layers, width, heads = values["layers"], values["width"], values["heads"]
    window = values["sliding-window"]
    return Architecture(
        0.0001, layers, width, heads, values["kv-heads"], width // heads, max(values["vocab"], 259),
        ffn_size=values["ffn"] or 2 * width, tied_embeddings=gemma,
        sliding_window=window or None, sliding_window_layers=(layers - layers // 6) if window else None,
    )  # fmt: skip


def captured_runs() -> list[Run]:
    runs = []
    for block in CAPTURED.read_text().split("# model: ")[1:]:
        model, command, lines = block.split("\n", 2)
        tiny = model.startswith("scripts/tiny-gguf ")
        arch = tiny_architecture(shlex.split(model)[1:]) if tiny else SMOLLM2
        flags = shlex.split(command.removeprefix("# command: "))
        value = {name: flags[flags.index(name) + 1] for name in ("-c", "--parallel", "-ub", "-fa")}
        parallel = int(value["--parallel"])
        runs.append(
            Run(model, arch, int(value["-c"]) // parallel, parallel, int(value["-ub"]), value["-fa"] == "on", lines)
        )
    return runs


RUNS = captured_runs()


def run_id(run: Run) -> str:
    name = (
        "smollm2"
        if run.arch is SMOLLM2
        else re.sub(r"\W+", "-", run.model.removeprefix("scripts/tiny-gguf ")).strip("-")
    )
    return f"{name}-c{run.context}x{run.parallel}-ub{run.ubatch}-fa{'on' if run.flash else 'off'}"


def test_the_captured_runs_cover_both_attentions_slots_and_sliding_windows() -> None:
    assert len(RUNS) >= 20
    assert {run.flash for run in RUNS} == {True, False}
    assert max(run.parallel for run in RUNS) >= 8 and any(run.arch.sliding_window for run in RUNS)


@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_the_compute_buffer_is_llama_servers_own_figure_within_ten_percent(run: Run) -> None:
    logged_mib = float(run.logged(r"CPU compute buffer size =\s*([\d.]+) MiB"))
    est = estimate(run.request())
    assert est.compute_gib * 1024 == pytest.approx(logged_mib, rel=0.10)


@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_the_graph_reserves_one_output_per_slot_and_the_output_buffer_holds_their_logits(run: Run) -> None:
    assert int(run.logged(r"n_outputs_max\s+=\s*(\d+)")) == run.parallel
    output_mib = run.parallel * run.arch.vocab_size * 4 / 2**20
    assert run.logged(r"CPU\s+output buffer size =\s*([\d.]+) MiB") == f"{output_mib:.2f}"
    assert f"({output_mib:.2f} MiB)" in graph_note(estimate(run.request()))


def test_smollm2_as_the_site_measured_it_is_exact() -> None:
    """Issue 31's site measurement: SmolLM2 Q4_1, 2 slots of 2048 tokens, flash attention left to llama-server
    (auto: on for CPU), measured 15.51 MiB of compute where the estimate said 105 MiB (+579 %)."""
    run = next(r for r in RUNS if r.arch is SMOLLM2 and (r.context, r.parallel, r.flash) == (2048, 2, True))
    est = estimate(replace(run.request(), flash_attn=None))
    assert f"{est.compute_gib * 1024:.2f}" == run.logged(r"CPU compute buffer size =\s*([\d.]+) MiB") == "15.51"


def test_the_largest_of_the_layers_and_the_logits_sets_the_buffer() -> None:
    """With 64 slots of a 262,144-token vocabulary the logits (64 rows, 64 MiB) outgrow a tiny model's layers; a
    build that reserved the whole micro-batch holds 512 rows."""
    run = next(r for r in RUNS if r.arch.vocab_size == 262144 and r.parallel == 64 and r.flash)
    est = estimate(run.request())
    assert est.compute_gib * GIB == pytest.approx(64 * (262144 + 2 * 64) * 4)
    old = estimate(replace(run.request(), ubatch_logits=True))
    assert old.compute_gib * GIB == pytest.approx(512 * (262144 + 2 * 64) * 4)
    assert "512 output row(s)" in graph_note(old) and "64 output row(s)" in graph_note(est)


@pytest.mark.parametrize(
    "build, ubatch",
    [
        ("llama.cpp b2961 (main)", True),
        ("llama.cpp b9409", True),
        ("llama.cpp b9479", False),
        ("llama-server (llama.cpp b10488)", False),
        ("ollama 0.6.2", True),
        ("ollama v0.30.0", True),
        ("ollama 0.30.1", False),
        ("ollama 0.32", False),
        ("vLLM V0 0.7.1", False),
        ("", False),
    ],
)
def test_a_builds_name_says_whether_it_reserved_logits_for_the_micro_batch(build: str, ubatch: bool) -> None:
    assert ubatch_logits_in(build) is ubatch


def test_the_published_llama_cpp_rows_are_read_with_their_builds_rule() -> None:
    rows = {row["id"]: row for row in confidence.reference_rows()}
    assert confidence.request_of(rows["LC03"]).ubatch_logits  # llama.cpp b2961
    assert not confidence.request_of(rows["p3"]).ubatch_logits  # no build named: the portal's rule
    # Either way the KQ scores of LC03's 32,000 cells set its buffer, not the logits of 512 x 32,000.
    request = confidence.request_of(rows["LC03"])
    assert estimate(request).compute_gib == estimate(replace(request, ubatch_logits=False)).compute_gib
