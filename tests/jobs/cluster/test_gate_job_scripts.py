"""What a restricted key's gate accepts as a job script (portal/gate_program.check_job_script with the rules from
jobs/cluster/jobscript.header_rules): every script the portal renders, with any values, and nothing else: no line
the renderer would not write, no body that is not the portal's, no binary the cluster does not name."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog.runtime_rules import RUNTIMES
from jobs.cluster import jobscript
from jobs.cluster.jobscript import RenderError, render
from portal.gate_program import check_job_script
from tests.jobs.cluster.test_jobscript import spec

RUNTIMES_LAUNCHED = sorted(name for name, rules in RUNTIMES.items() if rules.launchable)
BINARIES = ["/opt/llama.cpp/bin/llama-server", "/opt/vllm/bin/python"]


def rules(binaries: list[str] | None = None) -> dict[str, object]:
    pinned = {"SERVER_BIN": [jobscript.quoted(b) for b in (binaries or BINARIES)]}
    return {
        "body_starts": jobscript.BODY_STARTS,
        "bodies": sorted(hashlib.sha256(jobscript.body(r).encode()).hexdigest() for r in RUNTIMES_LAUNCHED),
        "header": jobscript.header_rules(pinned),
    }


@pytest.mark.parametrize("runtime", RUNTIMES_LAUNCHED)
def test_every_runtimes_script_passes(runtime: str) -> None:
    binary = "/opt/vllm/bin/python" if runtime in ("vllm", "transformers") else "/opt/llama.cpp/bin/llama-server"
    script = render(
        spec(runtime=runtime, binary=binary, stage_to="$TMPDIR", batch_run="5f8e6c2a-1b2c-4d3e-8f90-123456789abc")
    )
    assert check_job_script(script, rules()) == ""


WORDS = st.text(st.characters(exclude_characters="\n\x00", exclude_categories=["Cs"]), max_size=40)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=WORDS, served=WORDS, flags=st.lists(WORDS, max_size=4), module=WORDS)
def test_any_values_the_renderer_quotes_pass(model: str, served: str, flags: list[str], module: str) -> None:
    """Whatever a value holds, render writes it as one quoted word a line: the gate's rules read it so too."""
    try:
        script = render(spec(model_path=model, served_name=served, extra_flags=tuple(flags), modules=(module,)))
    except RenderError:
        return
    assert check_job_script(script, rules()) == ""


def tampered(script: str, old: str, new: str) -> str:
    assert old in script
    return script.replace(old, new, 1)


@pytest.mark.parametrize(
    "change, why",
    [
        (("SERVED_NAME=", "id >/tmp/x\nSERVED_NAME="), "line 'id >/tmp/x'"),
        (("SERVED_NAME=", "SERVED_NAME=$(id) #"), "line"),
        (("#SBATCH --output=job.log", "#SBATCH --output=/home/ada/.ssh/authorized_keys"), "line"),
        (("#SBATCH --partition=gpu", "#SBATCH --partition=gpu\n#SBATCH --export=ALL,LD_PRELOAD=/tmp/x.so"), "line"),
        (("#SBATCH --partition=gpu", "#SBATCH --partition=gpu\n#SBATCH --chdir=/tmp"), "line"),
        (("SERVER_BIN=/opt/llama.cpp/bin/llama-server", "SERVER_BIN=/usr/bin/python3"), "line"),
        (("MODULES=(", "MODULES=($(id) "), "line"),
        (("log() {", "curl http://127.0.0.1:9/x | sh\nlog() {"), "body is not one the portal renders"),
        (("# ---- skeleton.sh", "# ---- skeletons.sh"), "no job body"),
    ],
)
def test_anything_else_is_refused(change: tuple[str, str], why: str) -> None:
    script = render(spec())
    assert check_job_script(script, rules()) == ""
    problem = check_job_script(tampered(script, *change), rules())
    assert problem and why in problem


def test_a_binary_the_cluster_does_not_name_is_refused() -> None:
    script = render(spec(binary="/home/ada/bin/not-llama"))
    assert "line 'SERVER_BIN=/home/ada/bin/not-llama'" in check_job_script(script, rules())
    assert check_job_script(script, rules(["/home/ada/bin/not-llama"])) == ""
