"""Job scripts: valid bash for every runtime, and hostile values either refused or inert."""

from __future__ import annotations

import dataclasses
import subprocess
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.cluster.jobscript import JobSpec, RenderError, extra_files, render
from tests.jobs.cluster.jobside import session_dir

SID = "0f8e6c2a-1b2c-4d3e-8f90-123456789abc"


def spec(**changes: object) -> JobSpec:
    base = JobSpec(
        session_id=SID,
        runtime="llama.cpp",
        partition="gpu",
        account="lab",
        nodes=1,
        gpus_per_node=1,
        gres_type="a100",
        constraint="a100-80g",
        cpus_per_node=4,
        memory_gib=16,
        walltime_min=60,
        binary="/opt/llama.cpp/bin/llama-server",
        rpc_binary="/opt/llama.cpp/bin/ggml-rpc-server",
        served_name="Llama-3.1-8B-Instruct-Q4_K_M",
        context_length=8192,
        parallel=2,
        model_path="/data/models/llama.gguf",
        ollama_tag="llama3.1:8b",
        modules=("cuda/12.1", "llama.cpp"),
        default_flags=("--metrics",),
        extra_flags=("--flash-attn", "on"),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def bash_n(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"job-{uuid.uuid4().hex}.sh"
    path.write_text(script)
    return subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)


@pytest.mark.parametrize(
    "runtime, nodes",
    [("llama.cpp", 1), ("llama.cpp", 3), ("ollama", 1), ("vllm", 1), ("transformers", 1)],
)
def test_every_runtime_renders_a_script_bash_accepts(runtime: str, nodes: int, tmp_path: Path) -> None:
    script = render(spec(runtime=runtime, nodes=nodes))
    result = bash_n(script, tmp_path)
    assert result.returncode == 0, result.stderr
    assert script.startswith("#!/bin/bash\n#SBATCH --job-name=hpcllm-" + SID)
    assert "#SBATCH --gres=gpu:a100:1" in script
    assert f"#SBATCH --nodes={nodes}" in script


def test_the_api_key_never_reaches_a_command_line() -> None:
    for runtime in ("llama.cpp", "vllm", "ollama", "transformers"):
        script = render(spec(runtime=runtime))
        assert "--api-key " not in script and "--api-key=" not in script
    assert "--api-key-file" in render(spec())


@pytest.mark.parametrize(
    "runtime, launch", [("vllm", '"${SERVE[@]}"'), ("transformers", '"$SERVER_BIN" "$SESSION_DIR/tfserve.py"')]
)
def test_python_servers_listen_only_on_a_private_socket_behind_the_key_proxy(runtime: str, launch: str) -> None:
    script = render(spec(runtime=runtime))
    serve = script[script.index(launch) :].split("&\n")[0]
    assert "--uds" in serve or "--socket" in serve
    assert "--host" not in serve and "--port" not in serve
    assert 'serve_behind_key_proxy "$SERVER_PID" --upstream-socket "$SOCKET"' in script
    assert "one_node_on_private_socket" in script.split(f"# ---- {runtime}.sh")[-1]  # it asks for the 0700 directory
    assert "keyproxy.py" in extra_files(runtime)
    assert "#SBATCH --exclusive" not in script  # a socket in a 0700 directory needs no node to itself


def test_vllm_runs_as_its_command_or_as_a_python_module() -> None:
    script = render(spec(runtime="vllm"))
    assert 'python*) SERVE=("$SERVER_BIN" -m vllm.entrypoints.openai.api_server --model "$MODEL_PATH")' in script
    assert '*) SERVE=("$SERVER_BIN" serve "$MODEL_PATH")' in script


def test_an_embeddings_session_asks_each_runtime_for_its_embedding_endpoint() -> None:
    assert "EMBEDDINGS=0" in render(spec())
    llama = render(spec(embeddings=True))
    assert "EMBEDDINGS=1" in llama and "TASK_FLAGS=(--embeddings --pooling mean)" in llama
    assert '"$SERVER_BIN" "${TASK_FLAGS[@]}" "${DEFAULT_FLAGS[@]}"' in llama  # the cluster's flags come after
    assert "TASK_FLAGS=(--runner pooling --convert embed)" in render(spec(runtime="vllm", embeddings=True))
    with pytest.raises(RenderError, match="cannot serve embeddings"):
        render(spec(runtime="transformers", embeddings=True))


def server_argv(tmp_path: Path, **changes: object) -> list[str]:
    """Run the rendered job with a stand-in server that writes down the arguments it was started with, then exits."""
    home = tmp_path / f"home-{uuid.uuid4().hex[:8]}"
    session_dir(home, SID)
    (home / "model").mkdir()  # a Hugging Face directory for vLLM
    (home / "model.gguf").write_bytes(b"GGUF")
    server = home / "server"
    server.write_text('#!/bin/sh\nprintf "%s\\n" "$@" >"$HOME/argv"\nexit 3\n')
    server.chmod(0o755)
    model = home / ("model.gguf" if changes.get("runtime", "llama.cpp") == "llama.cpp" else "model")
    script = render(spec(binary=str(server), modules=(), model_path=str(model), **changes))
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "USER": "tester"}
    subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env)
    return (home / "argv").read_text().splitlines()


def test_vllm_turns_tool_calling_on_with_the_cards_parser_before_the_clusters_flags(tmp_path: Path) -> None:
    argv = server_argv(tmp_path, runtime="vllm", tool_call_parser="hermes")
    tools = argv.index("--enable-auto-tool-choice")
    assert argv[tools + 1 : tools + 3] == ["--tool-call-parser", "hermes"]
    assert tools < argv.index("--flash-attn")  # the cluster's extra flags come last, so a site can still change it
    assert "--enable-auto-tool-choice" not in server_argv(tmp_path, runtime="vllm")  # the card names no parser
    embeddings = server_argv(tmp_path, runtime="vllm", tool_call_parser="hermes", embeddings=True)
    assert "--tool-call-parser" not in embeddings and "--enable-auto-tool-choice" not in embeddings


def test_llama_server_reads_the_chat_template_with_jinja_before_the_sites_flags(tmp_path: Path) -> None:
    argv = server_argv(tmp_path)
    assert argv[0] == "--jinja" and argv.index("--jinja") < argv.index("--metrics")  # a site's --no-jinja wins
    assert "--jinja" not in server_argv(tmp_path, embeddings=True)


def test_a_tool_call_parser_vllm_does_not_know_is_refused() -> None:
    assert "TOOL_CALL_PARSER=''" in render(spec(runtime="vllm"))
    assert "TOOL_CALL_PARSER=llama3_json" in render(spec(runtime="vllm", tool_call_parser="llama3_json"))
    for name in ("qwen2_5", "hermes --tool-parser-plugin /tmp/x.py", "$(id)", "hermes\n"):
        with pytest.raises(RenderError, match="not one of vLLM's tool-call parsers"):
            render(spec(runtime="vllm", tool_call_parser=name))


def test_vllm_over_several_nodes_is_refused_with_the_reason() -> None:
    with pytest.raises(RenderError, match="unauthenticated"):
        render(spec(runtime="vllm", nodes=2))


def test_llama_cpp_over_nodes_holds_them_exclusively_and_ships_the_rpc_relay() -> None:
    assert "#SBATCH --exclusive" not in render(spec(nodes=1))
    script = render(spec(nodes=2, rpc_binary="/opt/llama/ggml-rpc-server"))
    assert "#SBATCH --exclusive=user" in script
    assert '"$RPC_BIN" -H 127.0.0.1' in script and 'rpcrelay.py" serve' in script
    assert "rpcrelay.py" in extra_files("llama.cpp")


def test_ollama_asks_for_the_node_to_itself_and_ships_the_key_proxy() -> None:
    script = render(spec(runtime="ollama"))
    assert "#SBATCH --exclusive=user" in script
    assert 'OLLAMA_HOST="127.0.0.1:' in script
    assert "keyproxy.py" in extra_files("ollama")


def test_sbatch_lines_refuse_values_sbatch_would_misread() -> None:
    for field, value in [
        ("partition", "gpu\n#SBATCH --uid=0"),
        ("partition", "gpu --exclusive"),
        ("account", "lab;rm"),
        ("gres_type", "a100:8"),
        ("constraint", "a100|h100"),
        ("session_id", "../../etc"),
    ]:
        with pytest.raises(RenderError):
            render(spec(**{field: value}))


def test_counts_must_be_positive_integers() -> None:
    for field in ("nodes", "gpus_per_node", "context_length", "parallel", "walltime_min", "memory_gib"):
        with pytest.raises(RenderError):
            render(spec(**{field: 0}))


def test_multi_node_llama_needs_the_rpc_server_and_ollama_stays_on_one_node() -> None:
    with pytest.raises(RenderError, match="ggml-rpc-server"):
        render(spec(nodes=2, rpc_binary=""))
    with pytest.raises(RenderError, match="single node"):
        render(spec(runtime="ollama", nodes=2))


hostile = st.lists(
    st.sampled_from([*"ab$`'\"\\;|&()<>{}*?!# \t\n~=-", "$(touch PWNED)", "`touch PWNED`", "'; touch PWNED; '"]),
    min_size=1,
    max_size=12,
).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["binary", "model_path", "served_name", "ollama_tag", "model_dir", "rpc_binary"]),
    value=hostile,
    flags=st.lists(hostile, max_size=3),
    module=hostile,
)
def test_hostile_values_arrive_quoted_and_are_never_executed(
    field: str, value: str, flags: list[str], module: str, tmp_path: Path
) -> None:
    """Render with hostile values, then run only the header (the assignments) in bash and read the variables back."""
    try:
        script = render(spec(**{field: value}, extra_flags=tuple(flags), modules=(module,)))
    except RenderError:
        assert "\n" in value or any("\n" in f for f in flags) or "\n" in module or "\x00" in value
        return
    assert bash_n(script, tmp_path).returncode == 0
    header = script.split("# ---- skeleton.sh", 1)[0]
    var = {
        "binary": "SERVER_BIN",
        "model_path": "MODEL_PATH",
        "served_name": "SERVED_NAME",
        "ollama_tag": "OLLAMA_TAG",
        "model_dir": "MODEL_DIR",
        "rpc_binary": "RPC_BIN",
    }[field]
    probe = header + f'\nprintf "%s\\0" "${var}" "${{EXTRA_FLAGS[@]}}" "${{MODULES[@]}}"\n'
    result = subprocess.run(["bash", "-c", probe], capture_output=True, cwd=tmp_path, timeout=10)
    assert result.returncode == 0, result.stderr
    values = result.stdout.decode().split("\0")[:-1]
    assert values == [value, *flags, module]
    assert not (tmp_path / "PWNED").exists()


def test_a_batch_launch_runs_the_runner_after_the_server_and_ships_it() -> None:
    run_id = "5f8e6c2a-1b2c-4d3e-8f90-123456789abc"
    script = render(spec(batch_run=run_id, batch_concurrency=4))
    assert f"BATCH_RUN={run_id}" in script.splitlines() and "BATCH_CONCURRENCY=4" in script.splitlines()
    assert '[ -z "${BATCH_RUN:-}" ] || run_batch "$pid"' in script
    assert {"batchrun.py", "supervisor.py"} <= set(extra_files("llama.cpp", batch=True))
    assert not {"batchrun.py", "supervisor.py"} & set(extra_files("llama.cpp"))
    assert "BATCH_RUN=''" in render(spec()).splitlines()
    with pytest.raises(RenderError, match="batch run id"):
        render(spec(batch_run="../../etc"))


def test_replicas_hold_a_node_each_and_only_a_batch_launch_has_them() -> None:
    run_id = "5f8e6c2a-1b2c-4d3e-8f90-123456789abc"
    script = render(spec(batch_run=run_id, replicas=3))
    assert "#SBATCH --nodes=3" in script and "REPLICAS=3" in script.splitlines() and "NODES=1" in script.splitlines()
    assert (
        'srun --nodes="$others" --ntasks="$others" --ntasks-per-node=1 --relative=1 bash "$SESSION_DIR/$JOB_SCRIPT" '
        "replica" in script
    )
    with pytest.raises(RenderError, match="replicas are for batch launches"):
        render(spec(replicas=2))
    with pytest.raises(RenderError, match="replicas are for batch launches"):
        render(spec(batch_run=run_id, replicas=2, nodes=2))


@pytest.mark.parametrize("runtime", ["llama.cpp", "ollama", "vllm", "transformers"])
def test_every_helper_a_job_script_calls_is_defined_in_it(runtime: str) -> None:
    """bash -n cannot see a call to a function that no longer exists; the job would fail at run time."""
    import re

    script = render(spec(runtime=runtime, batch_run="5f8e6c2a-1b2c-4d3e-8f90-123456789abc", replicas=2))
    defined = set(re.findall(r"^([a-z_]+)\(\) \{", script, flags=re.MULTILINE))
    # Our helpers are snake_case words with an underscore, at the start of a command; comments and quoted text aside.
    code = re.sub(r"^\s*#.*$", "", script, flags=re.MULTILINE)
    code = re.sub(r'"[^"\n]*"' + r"|'[^'\n]*'", '""', code)
    called = set(re.findall(r"(?:^|[;&|(]|\bthen|\bdo|\belse)\s*([a-z]+_[a-z_]+)\b(?!=|\()", code, re.M))
    assert {"private_run_dir", "serve_until_end", "write_connection"} & (called | defined)
    assert called <= defined, f"called but not defined: {sorted(called - defined)}"
