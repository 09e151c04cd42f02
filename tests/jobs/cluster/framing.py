"""The login host's scripts (jobs/cluster/remote.py) here: fake Slurm commands and a home to run them with, and the
framed scripts' answers (the poll's, the listing's) for tests that stand in for the cluster, written as readable
`@@KIND ARGS` lines each followed by its body and printed as the scripts print them (remote.FRAMED)."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

from jobs.cluster import remote


def fake_bin(tmp_path: Path, **scripts: str) -> dict[str, str]:
    """Fake Slurm commands; each knows the literal text before the first field of squeue's format as $F (the frame
    the poll and the listing begin squeue's records with)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\nF=${SQUEUE_FORMAT-}; F=${F%%%*}\n" + body + "\n")
        path.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home)}


def run(command: str, env: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], input=stdin.decode(), capture_output=True, text=True, env=env)


def section(frame: str, kind: str, *args: str, body: str = "") -> str:
    """One section's line, as the scripts' `section` prints it."""
    return f"@@{frame} {' '.join([kind, *args])} {base64.b64encode(body.encode()).decode()}\n"


def framed(stdin: bytes | None, text: str) -> str:
    """`text` in sections (`@@KIND ARGS` starts one, the lines up to the next are its body) as the script would
    print it for the frame on this standard input; lines before the first section are left out. A command sent
    without a frame (a submit's tar, a cancel) gets `text` as it is."""
    frame = (stdin or b"").decode(errors="replace").strip()
    if not remote.FRAME.fullmatch(frame):
        return text
    out, head, body = [], "", []  # type: list[str], str, list[str]
    for line in [*text.split("\n"), "@@"]:
        if line.startswith("@@"):
            if head:
                out.append(section(frame, *head.split(), body="\n".join(body)))
            head, body = line[2:], []
        else:
            body.append(line)
    return "".join(out)
