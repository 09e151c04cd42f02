"""Serving a fine-tune run's adapter (docs/finetune.md, serving): the launch form's `adapter` and its refusals, the
job script's flags, the adapter's model name in the proxy (rewritten to the server's name for it) and in
/api/v1/models, and nobody else's adapters."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command

from catalog.models import Cluster, ClusterAccount, ModelVariant
from jobs.cluster import jobscript
from jobs.models import FineTuneRun, LLMSession, State, transition
from jobs.sessions.actions import launch
from jobs.sessions.forms import LaunchForm, values_of
from jobs.sessions.lifecycle import job_spec, max_lora_rank
from jobs.use import targets
from tests.asgi import Portal, bearer
from tests.conftest import LAUNCH
from tests.jobs.use.upstream import ANSWER, Server, token_of

pytestmark = pytest.mark.django_db
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def adapter(start: Callable[..., FineTuneRun]) -> FineTuneRun:
    """A completed LoRA run of tiny-llama, the owner's."""
    run = start(suffix="doors", lora_rank=4)
    FineTuneRun.objects.filter(pk=run.pk).update(state=FineTuneRun.State.COMPLETED, step=run.planned_steps)
    return FineTuneRun.objects.select_related("variant__model", "owner").get(pk=run.pk)


def refusal(owner: Any, **changes: Any) -> str:
    form = LaunchForm({**LAUNCH, **changes}, user=owner)
    assert not form.is_valid()
    return " ".join(str(e) for e in form.errors.get("adapter", form.errors.get("__all__", [])))


def test_a_session_loads_its_owners_adapters_by_their_model_names(adapter: FineTuneRun, owner: Any) -> None:
    assert adapter.model_name == f"ft:tiny-llama:ada:doors:{str(adapter.pk)[:8]}"
    session = launch(owner, {**LAUNCH, "adapter": adapter.model_name})
    assert list(session.adapters.all()) == [adapter]
    assert values_of(session, LaunchForm)["adapter"] == adapter.model_name  # relaunch and --json read it back


def test_the_command_line_takes_the_flag_more_than_once_or_a_comma_list(adapter: FineTuneRun, owner: Any) -> None:
    out = StringIO()
    flags = [f"--{k}={v}" for k, v in LAUNCH.items()]
    call_command("sessions", "launch", "--user", "ada", *flags, "--adapter", adapter.model_name, "--json", stdout=out)
    assert json.loads(out.getvalue())["adapter"] == adapter.model_name
    form = LaunchForm({**LAUNCH, "adapter": [adapter.model_name, f"{adapter.model_name}, "]}, user=owner)
    assert form.is_valid(), form.errors
    assert form.adapters == [adapter]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"runtime": "transformers"}, "Hugging Face transformers cannot load LoRA adapters; choose llama.cpp"),
        ({"purpose": "embeddings"}, "An embeddings session loads no LoRA adapters"),
    ],
)
def test_a_runtime_or_purpose_that_cannot_serve_an_adapter_is_refused_with_the_reason(
    adapter: FineTuneRun, owner: Any, change: dict[str, Any], message: str
) -> None:
    if change.get("runtime") == "transformers":
        change = {**change, "quant": "bf16"}  # the safetensors variant the run trained
    assert message in refusal(owner, adapter=adapter.model_name, **change)


def test_an_adapter_that_is_not_ready_or_not_of_this_model_or_not_ones_own_is_refused(
    adapter: FineTuneRun, owner: Any, other_user: Any, start: Callable[..., FineTuneRun]
) -> None:
    name = adapter.model_name
    assert "You have no fine-tune run named 'ft:nope'" in refusal(owner, adapter="ft:nope")
    FineTuneRun.objects.filter(pk=adapter.pk).update(state=FineTuneRun.State.RUNNING)
    assert f"{name} is running: only a completed run has an adapter to load" in refusal(owner, adapter=name)
    FineTuneRun.objects.filter(pk=adapter.pk).update(state=FineTuneRun.State.COMPLETED, method="full")
    assert "fine-tuned the whole model: it has no adapter to load" in refusal(owner, adapter=name)
    gpt2 = ModelVariant.objects.filter(model__name="GPT-2").first()
    FineTuneRun.objects.filter(pk=adapter.pk).update(method="lora", variant=gpt2)
    name = FineTuneRun.objects.get(pk=adapter.pk).model_name
    assert f"{name} is an adapter of GPT-2, not of tiny-llama" in refusal(owner, adapter=name)
    FineTuneRun.objects.filter(pk=adapter.pk).update(variant=adapter.variant, cluster=Cluster.objects.get(slug="v100"))
    assert "adapter is on V100 cluster: launch on that cluster" in refusal(owner, adapter=adapter.model_name)
    name = adapter.model_name
    ClusterAccount.objects.create(cluster=adapter.cluster, user=other_user, username="grace")
    assert "You have no fine-tune run named" in refusal(other_user, adapter=name)  # the owner's alone


def test_the_job_script_loads_the_adapters_for_llama_cpp_and_vllm(adapter: FineTuneRun, owner: Any) -> None:
    session = launch(owner, {**LAUNCH, "adapter": adapter.model_name})
    spec = job_spec(session)
    assert spec.adapters == (str(adapter.pk),) and spec.max_lora_rank == 8  # vLLM's smallest rank that holds 4
    script = jobscript.render(spec)
    assert f"ADAPTER_RUNS=({adapter.pk})" in script and "MAX_LORA_RANK=8" in script
    assert (max_lora_rank(16), max_lora_rank(17), max_lora_rank(4096)) == (16, 32, 512)


@pytest.mark.parametrize(
    "runtime, expected",
    [
        ("llama.cpp", ["--lora-scaled", "{dir}/{run}/adapter.gguf:0"]),
        ("vllm", ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "1", "--lora-modules",
                  "{run}={dir}/{run}/adapter"]),
    ],
)  # fmt: skip
def test_the_job_side_passes_each_runtimes_flags_and_fails_without_the_adapters_files(
    tmp_path: Any, runtime: str, expected: list[str]
) -> None:
    run = "0b5e5b9e-0000-4000-8000-000000000001"
    parts = "".join((jobscript.SCRIPTS_DIR / name).read_text() for name in ("server.sh",))
    script = (
        'set -euo pipefail\nlog() { :; }\nfail() { echo "FAIL $*"; exit 3; }\n'
        f"SESSIONS_DIR={tmp_path}\nADAPTER_GGUF=adapter.gguf\nADAPTER_DIR=adapter\nMAX_LORA_RANK=8\n"
        f"ADAPTER_RUNS=({run})\n{parts}\nlora_args {runtime}\nprintf '%s\\n' \"${{LORA_ARGS[@]}}\"\n"
    )
    missing = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert missing.returncode == 3 and "FAIL" in missing.stdout
    (tmp_path / run / "adapter").mkdir(parents=True)
    (tmp_path / run / "adapter.gguf").write_bytes(b"GGUF")
    (tmp_path / run / "adapter" / "adapter_config.json").write_text("{}")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split("\n")[:-1] == [e.format(dir=tmp_path, run=run) for e in expected]
    bad = script.replace(f"ADAPTER_RUNS=({run})", "ADAPTER_RUNS=(../../etc)")
    assert "bad adapter run" in subprocess.run(["bash", "-c", bad], capture_output=True, text=True).stdout


def test_a_fine_tune_run_converts_its_adapter_with_llama_cpps_converter_beside_llama_server(
    adapter: FineTuneRun,
) -> None:
    from jobs.finetune.lifecycle import job_spec as run_spec

    script = jobscript.render(run_spec(adapter))
    assert "LORA_CONVERTER=/var/cache/hpc-llm-portal/llama.cpp/0.3.36/convert/convert_lora_to_gguf.py" in script
    assert jobscript.lora_converter("llama-server") == ""  # a binary on the PATH: no converter known


def running_with(owner: Any, adapter: FineTuneRun, runtime: str = "llama.cpp", port: int = 9) -> LLMSession:
    changes = {"runtime": "vllm", "quant": "bf16"} if runtime == "vllm" else {}
    session = launch(owner, {**LAUNCH, **changes, "adapter": adapter.model_name})
    transition(session.pk, State.RUNNING, cause="test", host="127.0.0.1", port=port)
    return LLMSession.objects.get(pk=session.pk)


def test_the_adapters_name_reaches_a_running_session_that_loaded_it(
    adapter: FineTuneRun, owner: Any, running: LLMSession
) -> None:
    holder = targets.Holder(owner.pk)
    assert targets.target(holder, adapter.model_name) is None  # the plain session did not load it
    llama = running_with(owner, adapter)
    found = targets.target(holder, adapter.model_name)
    assert found is not None and found.pk == str(llama.pk) and found.lora == ((0, 1.0),)
    assert found.served_model == llama.served_model_name  # llama-server: the request's `lora` picks the adapter
    plain = targets.target(holder, "tiny")
    assert plain is not None and plain.pk == str(running.pk) and plain.lora is None  # a server without adapters
    base = targets.target(holder, str(llama.pk))
    assert base is not None and base.lora == ((0, 0.0),)  # every adapter at 0: the base weights
    assert targets.target(holder, adapter.model_name[:-1] + "x") is None


def test_a_vllm_session_names_the_adapter_by_its_lora_module(adapter: FineTuneRun, owner: Any) -> None:
    vllm = running_with(owner, adapter, "vllm")
    found = targets.target(targets.Holder(owner.pk), adapter.model_name)
    assert found is not None and found.pk == str(vllm.pk)
    assert found.served_model == str(adapter.pk) and found.lora is None


@pytest.mark.django_db(transaction=True)  # the door's lookups run on their own threads
def test_the_proxy_asks_the_server_for_the_adapter_and_lists_its_name(
    server: Server, adapter: FineTuneRun, owner: Any, running: LLMSession
) -> None:
    llama = running_with(owner, adapter)
    portal = Portal(bearer(token_of(owner)))
    reply = portal.post("/api/v1/chat/completions", json={**CHAT, "model": adapter.model_name})
    assert reply.status_code == 200 and reply.json() == ANSWER
    reply = portal.post("/api/v1/chat/completions", json={**CHAT, "model": str(llama.pk)})
    assert reply.status_code == 200
    tuned, base = (json.loads(sent.content) for sent in server.got)
    assert tuned == {**CHAT, "model": llama.served_model_name, "lora": [{"id": 0, "scale": 1.0}]}
    assert base == {**CHAT, "model": llama.served_model_name, "lora": [{"id": 0, "scale": 0.0}]}  # the base weights
    listed = {m["id"]: m for m in portal.get("/api/v1/models").json()["data"]}
    assert listed[adapter.model_name]["session"] == str(llama.pk)


@pytest.mark.django_db(transaction=True)
def test_another_user_neither_reaches_nor_sees_the_owners_adapter(
    server: Server, adapter: FineTuneRun, owner: Any, other_user: Any
) -> None:
    running_with(owner, adapter)
    portal = Portal(bearer(token_of(other_user)))
    reply = portal.post("/api/v1/chat/completions", json={**CHAT, "model": adapter.model_name})
    assert reply.status_code == 404 and not server.got
    assert adapter.model_name not in {m["id"] for m in portal.get("/api/v1/models").json()["data"]}
    assert targets.target(targets.Holder(other_user.pk), adapter.model_name) is None


def test_a_restricted_keys_gate_takes_the_adapters_uuids_and_the_clusters_own_converter_alone(
    adapter: FineTuneRun, owner: Any
) -> None:
    from jobs.finetune.lifecycle import job_spec as run_spec
    from jobs.gatekeeping import job_rules
    from portal.gate_program import check_job_script

    rules = job_rules(adapter.cluster)
    session = launch(owner, {**LAUNCH, "adapter": adapter.model_name})
    script = jobscript.render(job_spec(session))
    assert check_job_script(script, rules) == ""
    smuggled = script.replace(f"ADAPTER_RUNS=({adapter.pk})", "ADAPTER_RUNS=(../../../tmp/x)")
    assert "line" in check_job_script(smuggled, rules)
    trainer = jobscript.render(run_spec(adapter))
    assert check_job_script(trainer, rules) == ""
    converter = "/var/cache/hpc-llm-portal/llama.cpp/0.3.36/convert/convert_lora_to_gguf.py"
    assert "line" in check_job_script(trainer.replace(converter, "/tmp/mine.py"), rules)
