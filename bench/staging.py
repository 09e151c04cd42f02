"""Time to Running with and without staging the weights on node-local storage, for a model on a slow shared path.
A benchmark, not a test.

    .venv/bin/python bench/staging.py [--rate-mib 25] [--rounds 3]

The slow path stands in for a busy parallel filesystem: a FUSE filesystem (mfusepy, Debian's fuse3) serving the
directory of SmolLM2-135M's GGUF (98 MB, scripts/fetch-models) at --rate-mib MiB/s, one read at a time, with the
kernel's page cache dropped at every open, as on a shared filesystem another node has written. Each launch is the
portal's own: the job script rendered for llama.cpp, staged and sbatch'ed over SSH on the local cluster
(scripts/local-cluster) exactly as the portal submits it; the time is from sbatch to the job's connection.json (the
server answers its health check with the model loaded), read over SSH every 0.2 s. Three kinds of launch alternate
over the rounds: loading from the slow path; staging with the copy already on the node (the usual case after the
first session); staging with no copy there (the first session, and after a change of the model). Printed: the
median of each and the ratios against loading from the slow path. Needs root (the mount, and fuse3 is installed
when missing) and the local cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs.cluster import jobscript, layout, remote  # noqa: E402  (plain Python: no Django set-up needed)

CLUSTER = REPO / "var" / "local-cluster" / "cluster.json"
LLAMA_BIN = Path("/var/cache/hpc-llm-portal/llama.cpp/0.3.36/bin")
MIB = 1024**2


def serve_slow(source: str, mountpoint: str, rate: float) -> None:
    """The slow filesystem (run in a child process: FUSE's loop blocks)."""
    import mfusepy as fuse  # type: ignore[import-untyped]

    lock = threading.Lock()

    class Slow(fuse.Operations):  # type: ignore[misc]
        use_ns = True

        def _path(self, path: str) -> str:
            return os.path.join(source, path.lstrip("/"))

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            st = os.lstat(self._path(path))
            keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
            return {key.removesuffix("_ns"): getattr(st, key) for key in keys}

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._path(path))]

        def open(self, path: str, flags: int) -> int:
            return os.open(self._path(path), os.O_RDONLY)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            with lock:  # one read at a time, each as long as the rate allows
                time.sleep(size / rate)
                return os.pread(fh, size, offset)

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

    fuse.FUSE(Slow(), mountpoint, foreground=True, ro=True, allow_other=True, nothreads=True)


def ssh(cluster: dict[str, Any], command: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ssh", "-q", "-i", cluster["private_key"], "-o", f"UserKnownHostsFile={cluster['known_hosts']}",
         "-o", "BatchMode=yes", "-p", str(cluster["port"]), f"{cluster['user']}@{cluster['host']}", command],
        input=stdin, capture_output=True, timeout=120,
    )  # fmt: skip


def launch(cluster: dict[str, Any], model: str, stage_to: str) -> float:
    """Seconds from sbatch to the server's connection.json, for one session; its job is cancelled after."""
    session_id = str(uuid.uuid4())
    spec = jobscript.JobSpec(
        session_id=session_id, runtime="llama.cpp", partition="gpu", account="", nodes=1, gpus_per_node=1,
        gres_type="a100", constraint="", cpus_per_node=2, memory_gib=2, walltime_min=10,
        binary=str(LLAMA_BIN / "llama-server"), served_name="bench", context_length=512, parallel=1,
        model_path=model, stage_to=stage_to, ready_timeout_s=600,
    )  # fmt: skip
    payload = remote.submit_payload(jobscript.render(spec), "sk-hpcllm-bench-" + "x" * 30, {})
    started = time.monotonic()
    submitted = ssh(cluster, remote.submit_command(session_id, payload.sha256), payload.stdin)
    outcome = remote.parse_submit(submitted.stdout.decode())
    if submitted.returncode != 0 or not outcome.job_id:
        raise SystemExit(f"sbatch failed: {submitted.stderr.decode()}")
    directory = f"~/{layout.session_dir(str(session_id))}"
    wait = (
        f"until [ -f {directory}/connection.json ] || [ -f {directory}/error ]; do sleep 0.2; done; "
        f"cat {directory}/error 2>/dev/null"
    )
    waited = ssh(cluster, wait)
    elapsed = time.monotonic() - started
    ssh(cluster, remote.cancel_command(session_id, outcome.job_id))
    ssh(cluster, f"while squeue -h -j {shlex.quote(outcome.job_id)} 2>/dev/null | grep -q .; do sleep 0.2; done")
    if waited.stdout.strip():
        raise SystemExit(f"the job failed: {waited.stdout.decode()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate-mib", type=float, default=25.0, help="the slow path's read rate")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", nargs=3, metavar=("SOURCE", "MOUNTPOINT", "RATE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_slow(args.serve[0], args.serve[1], float(args.serve[2]))
        return
    if not CLUSTER.exists():
        raise SystemExit("start the local cluster first: scripts/local-cluster up")
    cluster = json.loads(CLUSTER.read_text())
    source = Path(cluster["models"]["smollm2"])
    if not shutil.which("fusermount3"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "fuse3"], check=True, capture_output=True)
    work = Path(tempfile.mkdtemp(prefix="hpcllm-bench-staging-"))
    work.chmod(0o755)
    shared, mountpoint, local = work / "shared", work / "slow", work / "node-local"
    shared.mkdir()
    mountpoint.mkdir()
    local.mkdir(mode=0o1777)
    local.chmod(0o1777)
    os.link(source, shared / source.name) if source.stat().st_dev == shared.stat().st_dev else shutil.copy(
        source, shared / source.name
    )
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(shared), str(mountpoint), str(args.rate_mib * MIB)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            if (mountpoint / source.name).exists():
                break
            time.sleep(0.1)
        else:
            raise SystemExit("the slow filesystem did not mount (is /dev/fuse there?)")
        model = str(mountpoint / source.name)
        size_mib = source.stat().st_size / MIB
        print(f"model: {source.name}, {size_mib:.0f} MiB on a path read at {args.rate_mib:g} MiB/s")
        launch(cluster, model, str(local))  # the copy the "reused" launches find
        times: dict[str, list[float]] = {"slow path": [], "staged, copy reused": [], "staged, first copy": []}
        for round_ in range(args.rounds):
            times["slow path"].append(launch(cluster, model, ""))
            times["staged, copy reused"].append(launch(cluster, model, str(local)))
            ssh(cluster, f"rm -rf {shlex.quote(str(local))}/hpc-llm-portal-*/*")
            times["staged, first copy"].append(launch(cluster, model, str(local)))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        baseline = statistics.median(times["slow path"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:>22}: median {median:6.2f} s to Running   ratio {median / baseline:5.2f} x the slow path")
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
