"""A shared adapter copied into the home of a grantee's cluster user (docs/finetune.md, sharing): the cluster's four
commands run for real in homes under tmp_path (the run's side sums and archives the adapter, the grantee's side says
what copy it holds and unpacks one), hostile archives refused whole, the copy re-checking the grant, the submit that
copies before sbatch (a refusal fails the session with the reason, an SSH error retries), and the job side reading the
copy."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from catalog.models import Cluster, ClusterAccount
from jobs.cluster import adaptercopy, jobscript, layout, remote
from jobs.models import FineTuneRun, FineTuneShare, LLMSession, State
from jobs.sessions import adapter_copies as copies
from jobs.sessions import lifecycle
from jobs.sessions.actions import launch
from portal import gate, ssh
from tests.conftest import LAUNCH

pytestmark = pytest.mark.django_db
RUN = "0b5e5b9e-0000-4000-8000-000000000001"
ENV = {"PATH": "/usr/bin:/bin"}


def on_cluster(home: Path, verb: gate.Verb, args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The verb's script as a plain key runs it (bash -c), with this home."""
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["bash", "-c", gate.command(verb, args)], env={**ENV, "HOME": str(home)}, input=stdin,
                          capture_output=True, check=False)  # fmt: skip


def trained(home: Path, run: str = RUN, gguf: bool = True) -> Path:
    """A run's directory as its job leaves it: the PEFT adapter, and the GGUF for llama.cpp."""
    folder = home / layout.session_file(run)
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(3000))
    if gguf:
        (folder / "adapter.gguf").write_bytes(b"GGUF" + os.urandom(2000))
    return folder


def summed(home: Path, run: str = RUN) -> str:
    answer = on_cluster(home, remote.ADAPTER_MANIFEST, [run])
    assert answer.returncode == 0, answer.stderr
    return answer.stdout.decode().split()[1]


def archive(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


def listing(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*"))


# --- the commands, for real ------------------------------------------------------------------------------------


def test_the_commands_copy_the_adapter_and_its_gguf_into_the_other_home_private_and_whole(tmp_path: Path) -> None:
    owner, grantee = tmp_path / "ada", tmp_path / "alan"
    source = trained(owner)
    checksum = summed(owner)
    bundle = on_cluster(owner, remote.ADAPTER_BUNDLE, [RUN])
    assert bundle.returncode == 0, bundle.stderr
    assert on_cluster(grantee, remote.ADAPTER_COPIED, [RUN]).stdout.strip() == b""  # no copy yet
    received = on_cluster(grantee, remote.ADAPTER_RECEIVE, [RUN, checksum, "100"], bundle.stdout)
    assert received.returncode == 0 and received.stdout.strip() == b"copied", received.stderr
    copy = grantee / layout.ADAPTERS_DIR / RUN
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter.gguf"):
        assert (copy / name).read_bytes() == (source / name).read_bytes()
        assert stat.S_IMODE((copy / name).stat().st_mode) == 0o600
    for folder in (grantee / layout.PORTAL_DIR, grantee / layout.ADAPTERS_DIR, copy, copy / "adapter"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(p.name for p in (grantee / layout.ADAPTERS_DIR).iterdir()) == [RUN]  # no temporary left
    assert on_cluster(grantee, remote.ADAPTER_COPIED, [RUN]).stdout.strip().decode() == checksum
    again = on_cluster(grantee, remote.ADAPTER_RECEIVE, [RUN, checksum, "100"], bundle.stdout)
    assert again.stdout.strip() == b"present"  # idempotent: the same adapter is not unpacked twice


def test_a_copy_that_does_not_sum_to_the_runs_checksum_is_refused_and_an_older_copy_replaced(tmp_path: Path) -> None:
    owner, grantee = tmp_path / "ada", tmp_path / "alan"
    trained(owner)
    first = summed(owner)
    bundle = on_cluster(owner, remote.ADAPTER_BUNDLE, [RUN]).stdout
    wrong = on_cluster(grantee, remote.ADAPTER_RECEIVE, [RUN, "0" * 64, "100"], bundle)
    assert wrong.returncode == remote.ADAPTER_COPY_REFUSED and b"differ" in wrong.stderr
    assert listing(grantee / layout.ADAPTERS_DIR) == []
    assert on_cluster(grantee, remote.ADAPTER_RECEIVE, [RUN, first, "100"], bundle).returncode == 0
    (owner / layout.session_file(RUN, "adapter.gguf")).write_bytes(b"GGUF again")  # a new adapter, a new sum
    second = summed(owner)
    assert second != first
    bundle = on_cluster(owner, remote.ADAPTER_BUNDLE, [RUN]).stdout
    assert on_cluster(grantee, remote.ADAPTER_RECEIVE, [RUN, second, "100"], bundle).stdout.strip() == b"copied"
    assert (grantee / layout.ADAPTERS_DIR / RUN / "adapter.gguf").read_bytes() == b"GGUF again"
    assert sorted(p.name for p in (grantee / layout.ADAPTERS_DIR).iterdir()) == [RUN]


@pytest.mark.parametrize(
    "members, reason",
    [
        ([(member("adapter/../../../../escaped"), b"x")], "not a plain relative name"),
        ([(member("/tmp/absolute"), b"x")], "not part of an adapter"),
        ([(member("adapter//etc/passwd"), b"x")], "not a plain relative name"),
        ([(member("adapter/./x"), b"x")], "not a plain relative name"),
        ([(member(".bashrc"), b"x")], "not part of an adapter"),
        ([(member("adapter/link", tarfile.SYMTYPE, "/etc/passwd"), b"")], "not a plain file"),
        ([(member("adapter/hard", tarfile.LNKTYPE, "adapter.gguf"), b"")], "not a plain file"),
        ([(member("adapter/tty", tarfile.CHRTYPE), b"")], "not a plain file"),
        ([(member("adapter/fifo", tarfile.FIFOTYPE), b"")], "not a plain file"),
        ([(member("adapter/big"), b"\0" * 3000)], "larger than 2048 bytes"),
        ([(member("adapter/a"), b"x"), (member("adapter/a"), b"y")], "File exists"),
        ([(member("adapter/new\nline"), b"x")], "not a plain relative name"),
    ],
)
def test_a_hostile_archive_is_refused_whole_and_leaves_nothing(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], reason: str
) -> None:
    grantee = tmp_path / "alan"
    # A good file first: what was unpacked before the refusal goes too.
    data = archive([(member("adapter/adapter_config.json"), b"{}"), *members])
    refused = on_cluster(grantee, remote.ADAPTER_RECEIVE, [RUN, "a" * 64, "2"], data)
    assert refused.returncode == remote.ADAPTER_COPY_REFUSED, refused
    assert reason in refused.stderr.decode(), refused.stderr
    assert listing(grantee / layout.ADAPTERS_DIR) == []
    assert not (tmp_path / "escaped").exists() and not (grantee / ".bashrc").exists()


def test_a_gzip_bomb_and_a_stream_that_is_not_a_tar_are_refused(tmp_path: Path) -> None:
    grantee = tmp_path / "alan"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:  # a 1-byte file, 20 MiB header
        info = member("adapter/x")
        info.size, info.pax_headers = 1, {"comment": "x" * (20 << 20)}
        tar.addfile(info, io.BytesIO(b"x"))
    assert len(buffer.getvalue()) < 1 << 20
    bomb = on_cluster(grantee, remote.ADAPTER_RECEIVE, [RUN, "a" * 64, "1"], buffer.getvalue())
    assert bomb.returncode == remote.ADAPTER_COPY_REFUSED and b"unpacks to more than" in bomb.stderr, bomb
    junk = on_cluster(grantee, remote.ADAPTER_RECEIVE, [RUN, "a" * 64, "1"], b"not a gzip at all")
    assert junk.returncode == remote.ADAPTER_COPY_REFUSED
    assert listing(grantee / layout.ADAPTERS_DIR) == []


def test_what_a_copy_cut_short_left_is_swept_once_it_is_old(tmp_path: Path) -> None:
    owner, grantee = tmp_path / "ada", tmp_path / "alan"
    trained(owner)
    copies_dir = grantee / layout.ADAPTERS_DIR
    (copies_dir / ".incoming-old" / "adapter").mkdir(parents=True)
    (copies_dir / ".incoming-new").mkdir()
    os.utime(copies_dir / ".incoming-old", (0, 0))
    bundle = on_cluster(owner, remote.ADAPTER_BUNDLE, [RUN]).stdout
    assert on_cluster(grantee, remote.ADAPTER_RECEIVE, [RUN, summed(owner), "100"], bundle).returncode == 0
    assert sorted(p.name for p in copies_dir.iterdir()) == [".incoming-new", RUN]  # a copy in progress is kept


def test_the_runs_side_refuses_an_adapter_with_a_link_and_says_nothing_of_none(tmp_path: Path) -> None:
    owner = tmp_path / "ada"
    source = trained(owner, gguf=False)
    assert on_cluster(owner, remote.ADAPTER_MANIFEST, ["0b5e5b9e-0000-4000-8000-000000000009"]).stdout == b""
    (source / "adapter" / "secrets").symlink_to(owner / ".ssh")
    linked = on_cluster(owner, remote.ADAPTER_MANIFEST, [RUN])
    assert linked.returncode == remote.ADAPTER_COPY_REFUSED and b"not a plain file" in linked.stderr


def test_the_commands_take_only_what_their_allow_lists_accept() -> None:
    for args in (["../etc", "a" * 64, "1"], [RUN, "A" * 64, "1"], [RUN, "a" * 64, "1" * 10], [RUN, "a" * 64, "-1"],
                 [RUN, "a" * 64], [RUN, "a" * 64, "1", "x"], [f"{RUN};id", "a" * 64, "1"]):  # fmt: skip
        with pytest.raises(gate.GateError):
            gate.command(remote.ADAPTER_RECEIVE, args, gated=True)
    for verb in (remote.ADAPTER_MANIFEST, remote.ADAPTER_BUNDLE, remote.ADAPTER_COPIED):
        with pytest.raises(gate.GateError):
            gate.command(verb, ["$(id)"], gated=True)
    assert gate.command(remote.ADAPTER_RECEIVE, [RUN, "a" * 64, "4194304"], gated=True) == (
        f"{gate.GATE_WORD} adapter-receive {RUN} {'a' * 64} 4194304"
    )


def test_the_program_checks_every_name_it_unpacks() -> None:
    for bad in ("", "adapter/", "adapter/..", "../adapter", "adapter/.hidden", "adapter/a\\b", "x/adapter", "gguf"):
        with pytest.raises(adaptercopy.Refused):
            adaptercopy.check_name(bad, "adapter", "adapter.gguf")
    assert adaptercopy.check_name("adapter/sub/adapter_model.safetensors", "adapter", "adapter.gguf") == [
        "adapter", "sub", "adapter_model.safetensors"
    ]  # fmt: skip


def test_the_job_side_loads_a_copied_adapter_from_the_copies(tmp_path: Path) -> None:
    other = "0b5e5b9e-0000-4000-8000-000000000002"
    parts = (jobscript.SCRIPTS_DIR / "server.sh").read_text()
    script = (
        'set -euo pipefail\nlog() { :; }\nfail() { echo "FAIL $*"; exit 3; }\n'
        f"SESSIONS_DIR={tmp_path}/sessions\nADAPTERS_DIR={tmp_path}/adapters\nADAPTER_GGUF=adapter.gguf\n"
        f"ADAPTER_DIR=adapter\nMAX_LORA_RANK=8\nADAPTER_RUNS=({other} {RUN})\nCOPIED_ADAPTERS=({RUN})\n{parts}\n"
        "lora_args llama.cpp\nprintf '%s\\n' \"${LORA_ARGS[@]}\"\n"
    )
    for folder in (tmp_path / "sessions" / other, tmp_path / "adapters" / RUN):
        folder.mkdir(parents=True)
        (folder / "adapter.gguf").write_bytes(b"GGUF")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split("\n")[:-1] == [
        "--lora-scaled", f"{tmp_path}/sessions/{other}/adapter.gguf:0",
        "--lora-scaled", f"{tmp_path}/adapters/{RUN}/adapter.gguf:0",
    ]  # fmt: skip


# --- the copy, as the submit makes it --------------------------------------------------------------------------


@pytest.fixture
def adapter(start: Callable[..., FineTuneRun]) -> FineTuneRun:
    run = start(suffix="doors", lora_rank=4)
    FineTuneRun.objects.filter(pk=run.pk).update(state=FineTuneRun.State.COMPLETED, step=run.planned_steps)
    return FineTuneRun.objects.select_related("variant__model", "owner", "account").get(pk=run.pk)


@pytest.fixture
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every account's commands run here, in a home named by its cluster user (tmp_path/<username>)."""

    def run_here(account: ClusterAccount, command: str, stdin: Any = None, **options: Any) -> ssh.CommandResult:
        data = stdin if isinstance(stdin, bytes | None) else b"".join(stdin)
        (tmp_path / account.username).mkdir(exist_ok=True)
        done = subprocess.run(["bash", "-c", command], env={**ENV, "HOME": str(tmp_path / account.username)},
                              input=data, capture_output=True, check=False)  # fmt: skip
        return ssh.CommandResult(done.returncode, done.stdout.decode(), done.stderr.decode())

    def read_here(target: ssh.SSHTarget, command: str, **options: Any) -> Iterator[bytes]:
        done = subprocess.run(["bash", "-c", command], env={**ENV, "HOME": str(tmp_path / target.username)},
                              capture_output=True, check=True)  # fmt: skip
        yield done.stdout

    monkeypatch.setattr(ClusterAccount, "run", run_here)
    monkeypatch.setattr(ssh.pool, "read", read_here)
    return tmp_path


def alans_session(adapter: FineTuneRun, owner: Any, shared_user: Any) -> LLMSession:
    """alan's session of the run's model with its adapter, through alan's own cluster user, shared with him."""
    alans = ClusterAccount.objects.create(cluster=Cluster.objects.get(slug="local"), user=shared_user, username="alan")
    FineTuneShare.objects.create(run=adapter, user=shared_user, created_by=owner)
    session = launch(shared_user, {**LAUNCH, "adapter": adapter.model_name, "account": alans.pk})
    return LLMSession.objects.select_related("account__cluster", "owner").get(pk=session.pk)


def test_a_grantees_session_gets_a_copy_in_its_own_home_once(
    adapter: FineTuneRun, owner: Any, shared_user: Any, homes: Path
) -> None:
    trained(homes / adapter.account.username, str(adapter.pk))
    session = alans_session(adapter, owner, shared_user)
    assert copies.copy_adapters(session) == [str(adapter.pk)]
    assert (homes / "alan" / layout.ADAPTERS_DIR / str(adapter.pk) / "adapter.gguf").read_bytes()[:4] == b"GGUF"
    assert copies.copy_adapter(adapter, session) == "present"
    script = jobscript.render(lifecycle.job_spec(session))
    assert f"ADAPTER_RUNS=({adapter.pk})" in script and f"COPIED_ADAPTERS=({adapter.pk})" in script
    owners = launch(owner, {**LAUNCH, "adapter": adapter.model_name})  # through the run's own cluster user: no copy
    assert copies.copied_adapters(owners) == [] and "COPIED_ADAPTERS=()" in jobscript.render(lifecycle.job_spec(owners))


def test_a_revoked_grant_a_gone_or_too_large_adapter_copies_nothing(
    adapter: FineTuneRun, owner: Any, shared_user: Any, homes: Path, settings: Any
) -> None:
    session = alans_session(adapter, owner, shared_user)
    with pytest.raises(copies.CopyRefused, match="no longer on the cluster"):
        copies.copy_adapter(adapter, session)
    trained(homes / adapter.account.username, str(adapter.pk))
    settings.PORTAL_ADAPTER_DOWNLOAD_MAX_BYTES = 2048
    with pytest.raises(copies.CopyRefused, match="more than the 0 MiB the portal copies"):
        copies.copy_adapter(adapter, session)
    FineTuneShare.objects.filter(run=adapter).update(revoked_at=timezone.now())
    with pytest.raises(copies.CopyRefused, match="no longer shared with alan"):
        copies.copy_adapter(adapter, session)
    assert not (homes / "alan" / layout.ADAPTERS_DIR).exists()


def test_the_submit_copies_first_and_fails_the_session_with_the_reason_or_tries_again(
    adapter: FineTuneRun, owner: Any, shared_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted: list[str] = []
    monkeypatch.setattr(ClusterAccount, "run", lambda account, command, **options: submitted.append(command))

    def refuse(session: LLMSession) -> list[str]:
        raise copies.CopyRefused("ft:x is no longer shared with alan: its adapter is not copied")

    monkeypatch.setattr(copies, "copy_adapters", refuse)
    session = alans_session(adapter, owner, shared_user)
    assert lifecycle.submit(str(session.pk), None).outcome == "failed"
    failed = LLMSession.objects.get(pk=session.pk)
    assert failed.state == State.FAILED and "no longer shared with alan" in failed.end_reason
    assert "cannot copy a shared adapter into alan's home" in failed.end_reason and submitted == []  # no sbatch

    def unreachable(session: LLMSession) -> list[str]:
        raise ssh.SSHUnavailable(None, "connection failed")

    monkeypatch.setattr(copies, "copy_adapters", unreachable)
    again = alans_session_again(adapter, shared_user)
    retried = lifecycle.submit(str(again.pk), None)
    assert retried.retry and "copying a shared adapter" in retried.message and submitted == []
    assert LLMSession.objects.get(pk=again.pk).state == State.SUBMITTING


def alans_session_again(adapter: FineTuneRun, shared_user: Any) -> LLMSession:
    alans = ClusterAccount.objects.get(username="alan")
    return launch(shared_user, {**LAUNCH, "adapter": adapter.model_name, "account": alans.pk})
