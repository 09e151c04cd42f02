"""staging.sh's stage_model run by bash on this machine: the copy, its reuse, room-making and clean-up.

Only `df` is stood in for (a script on PATH reporting a chosen capacity), so the room-making can be tested without
filling a disk, and in one test `chmod`, to see the modes it finds; everything else is the real shell, cp, flock and
find, on real directories (links, directories of another uid, /dev/shm).
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.cluster import layout
from tests.jobs.cluster import jobside

MIB = 1024**2


def stage(
    home: Path, model: Path, stage_to: str, keep: bool = True, capacity: int | None = None,
    env: dict[str, str] | None = None, session: str | None = None, before: str = "",
) -> tuple[str, str, dict[str, object]]:  # fmt: skip
    """Run stage_model as a job would (after the shell lines `before`); the model path it leaves, the log, and the
    staging report."""
    session = session or str(uuid.uuid4())
    values = {"SESSION_ID": session, "MODEL_PATH": str(model), "STAGE_TO": stage_to, "STAGE_KEEP": int(keep)}
    extra = dict(env or {})
    if capacity is not None:
        bin_dir = home / "bin"
        bin_dir.mkdir(exist_ok=True)
        # df -Pk DIR: a filesystem of `capacity` bytes whose use is what the staging root holds.
        (bin_dir / "df").write_text(
            '#!/bin/bash\nused=$(du -sk "${@: -1}" | cut -f 1)\n'
            f"echo 'Filesystem 1024-blocks Used Available Capacity Mounted'\n"
            f'echo "fake {capacity // 1024} $used $(({capacity // 1024} - used)) 0% /"\n'
        )
        (bin_dir / "df").chmod(0o755)
        extra["PATH"] = f"{bin_dir}:{extra.get('PATH', os.environ['PATH'])}"
    body = f'start_traps\n{before}\nstage_model\necho "MODEL_PATH=$MODEL_PATH"'
    done = jobside.run(home, body, values, parts=("skeleton.sh", "staging.sh"), env=extra)
    assert done.returncode == 0, done.stdout + done.stderr
    staged = done.stdout.rsplit("MODEL_PATH=", 1)[1].split("\n", 1)[0]
    report_file = jobside.session_dir(home, session) / layout.NAMES.staging_file
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    return staged, done.stdout, report


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "shared" / "tiny-Q8_0.gguf"
    path.parent.mkdir()
    path.write_bytes(os.urandom(3 * MIB))
    return path


def test_stage_copies_then_reuses_the_copy(home: Path, model: Path, tmp_path: Path) -> None:
    local = tmp_path / "local"
    first, log, report = stage(home, model, str(local))
    assert first.startswith(f"{local}/hpc-llm-portal-") and first.endswith("/tiny-Q8_0.gguf")
    assert Path(first).read_bytes() == model.read_bytes()
    assert "staging: copying 3 MiB from" in log
    assert report["state"] == "copied" and report["bytes"] == report["total"] == 3 * MIB
    assert report["from"] == str(model) and report["to"] == str(Path(first).parent)

    second, log, report = stage(home, model, str(local))
    assert second == first
    assert "reusing the copy" in log and "copying" not in log
    assert report["state"] == "reused"


def test_stage_copies_again_when_the_source_changed(home: Path, model: Path, tmp_path: Path) -> None:
    first, _, _ = stage(home, model, str(tmp_path / "local"))
    model.write_bytes(os.urandom(2 * MIB))
    second, log, _ = stage(home, model, str(tmp_path / "local"))
    assert second != first and "copying 2 MiB" in log
    assert Path(second).read_bytes() == model.read_bytes()


def test_stage_copies_every_part_of_a_split_gguf(home: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    parts = [shared / f"big-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for part in parts:
        part.write_bytes(os.urandom(MIB))
    (shared / "other.gguf").write_bytes(b"not part of it")
    staged, _, report = stage(home, parts[0], str(tmp_path / "local"))
    assert staged.endswith("/big-Q4_K_M-00001-of-00003.gguf")
    assert sorted(p.name for p in Path(staged).parent.iterdir()) == sorted([".complete", *(p.name for p in parts)])
    assert report["total"] == 3 * MIB


def test_stage_copies_a_model_directory(home: Path, tmp_path: Path) -> None:
    directory = tmp_path / "shared" / "Qwen2-0.5B"
    (directory / "sub").mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(os.urandom(MIB))
    (directory / "sub" / "tokenizer.json").write_text("{}")
    staged, _, _ = stage(home, directory, str(tmp_path / "local"))
    assert staged.endswith("/Qwen2-0.5B")
    assert (Path(staged) / "model.safetensors").read_bytes() == (directory / "model.safetensors").read_bytes()
    assert (Path(staged) / "sub" / "tokenizer.json").exists()


def test_stage_to_tmpdir_is_the_jobs_own(home: Path, model: Path, tmp_path: Path) -> None:
    job_tmp = tmp_path / "job-tmp"
    job_tmp.mkdir()
    staged, _, _ = stage(home, model, "$TMPDIR", env={"TMPDIR": str(job_tmp)})
    assert staged.startswith(f"{job_tmp}/hpc-llm-portal-")


def test_stage_without_keep_removes_the_copy_when_the_job_ends(home: Path, model: Path, tmp_path: Path) -> None:
    staged, log, _ = stage(home, model, str(tmp_path / "local"), keep=False)
    assert not Path(staged).exists() and "removed the copy" in log


def test_stage_makes_room_by_removing_the_oldest_unused_copy(home: Path, tmp_path: Path) -> None:
    local, shared = tmp_path / "local", tmp_path / "shared"
    shared.mkdir()
    models = []
    for name in ("a", "b", "c"):
        models.append(shared / f"{name}.gguf")
        models[-1].write_bytes(os.urandom(20 * MIB))
    capacity = 110 * MIB  # two copies and the 64 MiB margin fit; three do not
    a, _, _ = stage(home, models[0], str(local), capacity=capacity)
    b, _, _ = stage(home, models[1], str(local), capacity=capacity)
    os.utime(Path(b).parent, (1, 1))  # b is now the one used longest ago
    c, log, _ = stage(home, models[2], str(local), capacity=capacity)
    assert Path(c).exists() and Path(a).exists() and not Path(b).exists()
    assert f"removed the unused copy {Path(b).parent}" in log


def test_stage_never_removes_a_copy_in_use(home: Path, tmp_path: Path) -> None:
    local, shared = tmp_path / "local", tmp_path / "shared"
    shared.mkdir()
    (shared / "a.gguf").write_bytes(os.urandom(20 * MIB))
    (shared / "b.gguf").write_bytes(os.urandom(60 * MIB))
    a, _, _ = stage(home, shared / "a.gguf", str(local), capacity=140 * MIB)
    lock = Path(a).parent.with_suffix(".lock")
    holder = subprocess.Popen(["flock", "-s", str(lock), "sleep", "30"])  # another job serving from the copy
    try:
        subprocess.run(["bash", "-c", f"sleep 0.3; ! flock -n -x {shlex.quote(str(lock))} true"], check=True)
        staged, log, report = stage(home, shared / "b.gguf", str(local), capacity=140 * MIB)
    finally:
        holder.kill()
    assert Path(a).exists()
    assert staged == str(shared / "b.gguf") and "not enough space" in log and report["state"] == "skipped"


def test_stage_falls_back_to_the_shared_path_when_it_cannot_write(home: Path, model: Path, tmp_path: Path) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        # root writes anywhere: a directory under a file is one nobody can make
        target = str(model) + "/cannot" if os.access(read_only, os.W_OK) else str(read_only)
        staged, log, report = stage(home, model, target)
    finally:
        read_only.chmod(0o700)
    assert staged == str(model) and "cannot write in" in log and report["state"] == "skipped"


def test_stage_without_a_target_changes_nothing(home: Path, model: Path) -> None:
    staged, log, report = stage(home, model, "")
    assert staged == str(model) and "staging" not in log and report == {}


# --- the staging root: the user's own directory, or none -------------------------------------------------------------

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another uid needs root")
NOBODY = 65534


def root_in(base: Path) -> Path:
    """The user's staging root under a base, as stage_model names it."""
    return base / f"hpc-llm-portal-{pwd.getpwuid(os.geteuid()).pw_name}"


def copy_like(directory: Path, mtime: float = 1) -> Path:
    """A directory named like a copy (a 20-digit key), holding a canary, last used at `mtime`."""
    directory.mkdir()
    (directory / "canary").write_text("keep me")
    os.utime(directory, (mtime, mtime))
    return directory


def test_a_staging_root_that_is_a_link_is_refused_and_what_it_points_at_is_untouched(
    home: Path, tmp_path: Path
) -> None:
    # Planted in a shared /tmp before the user's first job: the chmod, the copy and the eviction would all land there.
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    victim.chmod(0o755)
    (victim / "canary").write_text("keep me")
    old = copy_like(victim / ("a" * 20))
    base = tmp_path / "local"
    base.mkdir()
    root_in(base).symlink_to(victim)
    (tmp_path / "shared").mkdir()
    model = tmp_path / "shared" / "m.gguf"
    model.write_bytes(os.urandom(MIB))
    staged, log, report = stage(home, model, str(base), capacity=65 * MIB)  # short of room: eviction would run
    assert staged == str(model) and report["state"] == "skipped"
    assert f"{root_in(base)} is a symbolic link, not a directory" in log and "loading" in log
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755
    assert sorted(p.name for p in victim.iterdir()) == ["a" * 20, "canary"]
    assert (old / "canary").read_text() == "keep me"


@as_root
def test_a_staging_root_owned_by_another_user_is_refused(home: Path, model: Path, tmp_path: Path) -> None:
    base = tmp_path / "local"
    base.mkdir()
    root = root_in(base)
    root.mkdir()
    root.chmod(0o777)
    os.chown(root, NOBODY, NOBODY)
    staged, log, report = stage(home, model, str(base))
    assert staged == str(model) and report["state"] == "skipped"
    assert f"{root} belongs to uid {NOBODY}" in log
    assert list(root.iterdir()) == [] and stat.S_IMODE(root.stat().st_mode) == 0o777


def test_a_base_others_can_write_without_the_sticky_bit_is_refused(home: Path, model: Path, tmp_path: Path) -> None:
    # Anyone could swap the user's root there for a link after the check; /tmp and /dev/shm have the sticky bit.
    open_base, sticky_base = tmp_path / "open", tmp_path / "sticky"
    for base, mode in ((open_base, 0o777), (sticky_base, 0o1777)):
        base.mkdir()
        base.chmod(mode)
    staged, log, report = stage(home, model, str(open_base))
    assert staged == str(model) and report["state"] == "skipped"
    assert f"others can write in {open_base} (mode 777, no sticky bit)" in log
    assert not root_in(open_base).exists()
    staged, _, report = stage(home, model, str(sticky_base))
    assert staged.startswith(f"{root_in(sticky_base)}/") and report["state"] == "copied"


def test_the_staging_root_is_private_from_its_first_moment(home: Path, model: Path, tmp_path: Path) -> None:
    # Under a umask that makes directories 0755, `mkdir -p` then `chmod 700` leaves a moment in which others can
    # look in (and open files) there; every chmod the job runs records the mode it found.
    tools, seen = tmp_path / "tools", tmp_path / "modes"
    tools.mkdir()
    (tools / "chmod").write_text(f'#!/bin/bash\nstat -c %a "${{@: -1}}" >>{seen}\nexec {shutil.which("chmod")} "$@"\n')
    (tools / "chmod").chmod(0o755)
    path = f"{tools}:{os.environ['PATH']}"
    staged, _, _ = stage(home, model, str(tmp_path / "local"), env={"PATH": path}, before="umask 022")
    assert staged.startswith(f"{root_in(tmp_path / 'local')}/")
    assert stat.S_IMODE(root_in(tmp_path / "local").stat().st_mode) == 0o700
    assert "755" not in (seen.read_text().split() if seen.exists() else [])


def test_eviction_removes_only_the_users_own_copies_never_a_link_or_what_it_points_at(
    home: Path, tmp_path: Path
) -> None:
    local, shared, outside = tmp_path / "local", tmp_path / "shared", tmp_path / "outside"
    shared.mkdir()
    outside.mkdir()
    (shared / "a.gguf").write_bytes(os.urandom(20 * MIB))
    (shared / "b.gguf").write_bytes(os.urandom(60 * MIB))
    a, _, _ = stage(home, shared / "a.gguf", str(local), capacity=140 * MIB)
    os.utime(Path(a).parent, (100, 100))
    # Named like copies and used longer ago than `a`: a link out of the root, and other things kept there.
    target = copy_like(outside / "models")
    link = root_in(local) / ("b" * 20)
    link.symlink_to(target)
    kept = copy_like(root_in(local) / "my-notes")
    staged, log, _ = stage(home, shared / "b.gguf", str(local), capacity=140 * MIB)
    assert staged.startswith(f"{root_in(local)}/") and not Path(a).exists()
    assert f"removed the unused copy {Path(a).parent}" in log
    assert link.is_symlink() and (target / "canary").read_text() == "keep me"
    assert (kept / "canary").exists()


@as_root
def test_eviction_leaves_a_directory_of_another_user_in_the_root(home: Path, tmp_path: Path) -> None:
    local, shared = tmp_path / "local", tmp_path / "shared"
    shared.mkdir()
    (shared / "a.gguf").write_bytes(os.urandom(20 * MIB))
    (shared / "b.gguf").write_bytes(os.urandom(60 * MIB))
    a, _, _ = stage(home, shared / "a.gguf", str(local), capacity=140 * MIB)
    os.utime(Path(a).parent, (100, 100))
    theirs = copy_like(root_in(local) / ("c" * 20))
    os.chown(theirs, NOBODY, NOBODY)
    os.utime(theirs, (1, 1))
    stage(home, shared / "b.gguf", str(local), capacity=140 * MIB)
    assert not Path(a).exists() and (theirs / "canary").exists()


# --- tmpfs: no copy outlives its job -------------------------------------------------------------------------------


@pytest.fixture
def shm() -> Iterator[Path]:
    """A base on /dev/shm for this test, removed afterwards."""
    if subprocess.run(["stat", "-f", "-c", "%T", "/dev/shm"], capture_output=True, text=True).stdout.strip() != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs here")
    path = Path(f"/dev/shm/hpcllm-test-{uuid.uuid4().hex[:8]}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_copy_in_memory_is_removed_when_its_job_ends_even_with_keep(home: Path, model: Path, shm: Path) -> None:
    shm.mkdir()
    root_in(shm).mkdir(mode=0o700)
    leftover = copy_like(root_in(shm) / ("d" * 20))  # a job that died without its trap
    staged, log, report = stage(home, model, str(shm), keep=True)
    assert staged.startswith(f"{root_in(shm)}/") and report["state"] == "copied"
    assert f"staging: {shm} is in memory (tmpfs): the copy goes when the job ends" in log
    assert not Path(staged).exists() and "removed the copy" in log
    assert not leftover.exists()
