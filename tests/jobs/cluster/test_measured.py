"""A session's measured figures read from its job's log (jobs/cluster/measured.py).

The excerpts in data/measured/ are of two kinds:
- real, produced on this machine: llama-server-0.3.36-cpu.log (the llama.cpp the portal pins, SmolLM2-135M Q4_1 on
  CPU at -lv 4, one request), llama-server-0.3.36-rpc.log (the same over ggml-rpc-server, -ngl 99 --rpc), and
  vllm-0.32.0-cpu.log (vLLM's CPU build, SmolLM2-135M, --kv-cache-memory-bytes 64M, three requests);
- written with the runtimes' own printf formats, for hardware this machine lacks: llama-server-b5921-cuda.log
  (src/llama-model.cpp "%s: %12s model buffer size = %8.2f MiB", src/llama-kv-cache-unified.cpp "%s: %10s KV buffer
  size = %8.2f MiB", src/llama-context.cpp "%s: %10s compute buffer size = %8.2f MiB" and "%s: %10s  output buffer
  size", tools/server's print_timing "prompt eval time = %10.2f ms / %5d tokens (%8.2f ms per token, %8.2f tokens
  per second)"), llama-server-b3600-2gpu.log (2024: llm_load_tensors "%s: %10s buffer size = %8.2f MiB",
  llama_kv_cache_init, llama_new_context_with_model), vllm-0.32.0-2gpu.log (v1/worker/gpu_model_runner.py "Model
  loading took %s GiB memory and %.6f seconds", v1/worker/gpu_worker.py "Available KV cache memory: %s GiB", one
  line per tensor-parallel worker) and vllm-0.8-v0.log (worker.py's "model weights take %.2fGiB; non_torch_memory
  takes %.2fGiB; PyTorch activation peak memory takes %.2fGiB; the rest of the memory reserved for KV Cache is
  %.2fGiB.", every line prefixed by vLLM's NewLineFormatter).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.cluster import layout, measured
from tests.jobs.cluster import jobside
from tests.jobs.cluster.framing import fake_bin
from tests.jobs.cluster.test_tfserve import load_tfserve

DATA = Path(__file__).parent / "data" / "measured"
SID = "0f8e6c2a-1b2c-4d3e-8f90-123456789abc"


def figures(name: str) -> dict[str, Any]:
    return measured.parse((DATA / name).read_text())


def test_llama_server_on_cpu_reports_its_cpu_buffers_and_its_own_speeds() -> None:
    found = figures("llama-server-0.3.36-cpu.log")
    assert found["weights_gib"] == round(92.10 / 1024, 6)
    assert found["kv_gib"] == round(90.00 / 1024, 6)
    assert found["compute_gib"] == round(15.51 / 1024, 6)
    assert found["total_gib"] == round((92.10 + 90.00 + 15.51) / 1024, 6)
    assert found["prompt_tokens_per_s"] == pytest.approx(22.15, abs=0.01)  # as the server printed it
    assert found["tokens_per_s"] == pytest.approx(1.75, abs=0.01)
    assert found["devices"] == {"CPU_Mapped": {"weights_gib": 0.089941}, "CPU": {"kv_gib": 0.087891,
                                                                              "compute_gib": 0.015146}}  # fmt: skip


def test_over_rpc_the_remote_devices_buffers_count_and_the_hosts_are_listed() -> None:
    found = figures("llama-server-0.3.36-rpc.log")
    assert found["weights_gib"] == round(92.10 / 1024, 6)  # the RPC device's, not the 28.69 MiB left on the host
    assert found["kv_gib"] == round(45.00 / 1024, 6)
    assert found["compute_gib"] == round(14.38 / 1024, 6)
    assert set(found["devices"]) == {"CPU_Mapped", "CPU", "RPC0[127.0.0.1:18557]"}


def test_one_cuda_gpu_counts_the_gpus_buffers_only() -> None:
    found = figures("llama-server-b5921-cuda.log")
    assert found["weights_gib"] == round(4403.49 / 1024, 6)
    assert found["kv_gib"] == 1.0
    assert found["compute_gib"] == round(560.00 / 1024, 6)  # CUDA_Host's pinned 24 MiB is host memory
    assert found["devices"]["CUDA_Host"] == {"compute_gib": round(24.01 / 1024, 6)}
    # two requests weighed by their tokens: (412 + 150) / (85.12 + 40.06) ms, as the server timed them
    assert found["prompt_tokens_per_s"] == pytest.approx(562 / 0.12518, rel=1e-3)
    assert found["tokens_per_s"] == pytest.approx(416 / 3.63115, rel=1e-3)


def test_two_gpus_of_a_2024_build_add_up_and_nvidia_smi_gives_the_total() -> None:
    found = figures("llama-server-b3600-2gpu.log")
    assert found["weights_gib"] == round((19639.69 + 19388.27) / 1024, 6)
    assert found["kv_gib"] == round((656 + 624) / 1024, 6)
    assert found["compute_gib"] == round((324.01 + 344.02) / 1024, 6)
    assert found["total_gib"] == round((21427 + 21151) / 1024, 6) and found["total_from"] == "nvidia-smi"
    assert "prompt_tokens_per_s" not in found


def test_vllm_on_cpu_gives_its_checkpoint_and_kv_cache() -> None:
    assert figures("vllm-0.32.0-cpu.log") == {"weights_gib": 0.25, "kv_gib": 0.06, "total_gib": 0.31,
                                              "total_from": "buffers"}  # fmt: skip


def test_vllm_tensor_parallel_adds_its_workers() -> None:
    found = figures("vllm-0.32.0-2gpu.log")
    assert found["weights_gib"] == 15.02 and found["kv_gib"] == 116.64
    assert found["total_gib"] == round(2 * 72811 / 1024, 6)


def test_vllm_v0_gives_weights_activations_and_kv_cache() -> None:
    assert figures("vllm-0.8-v0.log") == {"weights_gib": 14.99, "kv_gib": 54.56, "compute_gib": 1.42,
                                          "total_gib": 70.97, "total_from": "buffers"}  # fmt: skip


def test_a_restarted_server_counts_its_last_start() -> None:
    text = (DATA / "llama-server-b5921-cuda.log").read_text()
    again = text.replace("4403.49", "4000.00").replace("1024.00 MiB", "2048.00 MiB")
    found = measured.parse(text + again)
    assert found["weights_gib"] == round(4000 / 1024, 6) and found["kv_gib"] == 2.0


def test_the_transformers_peak_is_the_total_where_nvidia_smi_is_silent() -> None:
    tfserve = load_tfserve()
    assert tfserve.TORCH_PEAK_LINE == measured.TORCH_PEAK_LINE
    assert measured.parse(f"{tfserve.TORCH_PEAK_LINE} 1024, 2048\n") == {"total_gib": 3.0, "total_from": "torch"}


@pytest.mark.parametrize(
    "line",
    [
        "load_tensors:        CUDA0 model buffer size =      nan MiB",
        "load_tensors:        CUDA0 model buffer size =     -nan MiB",
        "load_tensors:        CUDA0 model buffer size =      inf MiB",
        "load_tensors:        CUDA0 model buffer size =  -400.00 MiB",
        "load_tensors:        CUDA0 model buffer size = 99999999999.00 MiB",
        "load_tensors:        CUDA0 model buffer size = 1e400 MiB",
        "load_tensors:        CUDA0 model buffer size =   400.00 MiB and more",
        "load_tensors: CUDA0 model buffer size = 400.00 MiB" + " " * 400,
        "load_tensors:     CU DA0 model buffer size =   400.00 MiB",
        "load_tensors:  <script>alert(1)</script> model buffer size =   400.00 MiB",
        "user prompt: load_tensors is nice CUDA0 model buffer size = 400 MiB",
        "prompt eval time =    -10.00 ms /    37 tokens (   -0.27 ms per token,    nan tokens per second)",
        "       eval time =      0.00 ms /    99999999999 tokens (    0.00 ms per token,    inf tokens per second)",
        "[2026-12-07 15:41:45] portal: nvidia-smi memory.used MiB: 1234, -5",
        "[2026-12-07 15:41:45] portal: nvidia-smi memory.used MiB: 12345678901",
        "(Worker_TP0 pid=1) INFO 12-07 15:41:25 [x.py:1] Model loading took NaN GiB memory and 1.0 seconds",
        "(Worker_TP0 pid=1) INFO 12-07 15:41:25 [x.py:1] Available KV cache memory: 1e9 GiB",
        "Available KV cache memory: 5.00 GiB",
        "\x00\xff\ufffd" * 100,
    ],
)
def test_garbage_and_absurd_numbers_are_refused_without_error(line: str) -> None:
    assert measured.parse(line + "\n") == {}


def test_a_huge_answer_is_read_only_to_its_bound() -> None:
    line = "load_tensors:        CUDA0 model buffer size =   400.00 MiB\n"
    assert measured.parse("x" * (measured.MAX_TEXT_CHARS + 10) + "\n" + line) == {}
    assert measured.parse("y" * 10_000_000)  == {}  # fmt: skip


@given(st.text(max_size=2000))
def test_any_text_parses_to_known_finite_figures_only(text: str) -> None:
    found = measured.parse(text)
    assert set(found) <= {*measured.FIELDS, "devices", "total_from"}
    assert all(0 <= found[name] <= measured.MAX_TOKENS_PER_S for name in measured.FIELDS if name in found)


def test_what_is_kept_passes_clean_again_and_clean_drops_anything_else() -> None:
    found = figures("llama-server-b3600-2gpu.log")
    assert measured.clean(found) == found
    devices = {"<b>": {"kv_gib": 1}, "CUDA0": {"kv_gib": 1e12, "weights_gib": 2}}
    hostile = {"weights_gib": "1", "kv_gib": True, "total_gib": float("nan"), "tokens_per_s": -1.0, "x": 1,
               "compute_gib": 0.5, "devices": devices}  # fmt: skip
    assert measured.clean(hostile) == {"compute_gib": 0.5, "devices": {"CUDA0": {"weights_gib": 2.0}}}
    # what a total is: one of the catalog's words, and only beside a total
    assert measured.clean({"total_gib": 1, "total_from": "<script>"}) == {"total_gib": 1.0}
    assert measured.clean({"total_from": "torch"}) == {}
    assert measured.clean([1, 2]) == {} and measured.clean(None) == {}


def run_measure(tmp_path: Path, log_text: bytes) -> subprocess.CompletedProcess[str]:
    env = fake_bin(tmp_path)
    directory = Path(env["HOME"]) / layout.session_dir(SID)
    directory.mkdir(parents=True)
    (directory / layout.NAMES.job_log).write_bytes(log_text)
    script = measured.MEASURE.script
    return subprocess.run(["bash", "-c", script, "measure", SID], capture_output=True, text=True, env=env)


def test_the_measure_command_keeps_only_the_lines_that_can_matter_and_bounds_them(tmp_path: Path) -> None:
    real = (DATA / "llama-server-0.3.36-cpu.log").read_bytes()
    noise = b"".join(b"slot print_timing: id  0 | task %d |        eval time =      10.00 ms /    10 tokens "
                     b"(    1.00 ms per token,  1000.00 tokens per second)\n" % i for i in range(6000))  # fmt: skip
    long_line = b"load_tensors: " + b"A" * 100_000 + b" model buffer size =   1.00 MiB\n"
    result = run_measure(tmp_path, real + long_line + noise + b"\x00binary\xff\n" * 1000)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) <= 400 + 4000 + 64 and all(len(line) <= measured.LINE_CHARS for line in lines)
    assert len(result.stdout.encode()) <= measured.MAX_OUTPUT_BYTES
    found = measured.parse(result.stdout)
    assert found["weights_gib"] == round(92.10 / 1024, 6) and found["tokens_per_s"] == pytest.approx(1000, rel=0.01)


def test_the_measure_command_says_nothing_for_a_session_without_a_log(tmp_path: Path) -> None:
    env = fake_bin(tmp_path)
    result = subprocess.run(["bash", "-c", measured.MEASURE.script, "measure", SID], capture_output=True, text=True,
                            env=env)  # fmt: skip
    assert result.returncode == 0 and result.stdout == ""


def test_the_jobs_gpu_line_is_the_one_the_portal_reads(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/bash\nprintf '21427\\n21151\\n'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "0,1"}
    done = jobside.run(tmp_path, "log_gpu_memory", env=env)
    assert done.returncode == 0, done.stderr
    assert measured.parse(done.stdout) == {"total_gib": round((21427 + 21151) / 1024, 6), "total_from": "nvidia-smi"}
