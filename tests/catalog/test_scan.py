"""`catalog scan`: model directories walked through a Reader (here the local one on temporary directories, and the SSH
reader's own commands run by a local shell), the models found added whole, the broken ones skipped with a reason."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import struct
import subprocess
from dataclasses import replace
from io import StringIO
from pathlib import Path
from typing import Any

import gguf as gguf_pkg
import numpy as np
import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import Client

from catalog import add_model, scan
from catalog.add_model import LocalReader, Outcome, SSHReader, add_all
from catalog.models import Cluster, ModelCard, ModelVariant, VariantLocation
from portal import ssh

pytestmark = pytest.mark.django_db
VOCAB, WIDTH = 300, 64
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "max_position_embeddings": 2048, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "torch_dtype": "bfloat16", "vocab_size": 300,
}  # fmt: skip


def write_gguf(
    path: Path, file_type: gguf_pkg.LlamaFileType | None = gguf_pkg.LlamaFileType.MOSTLY_Q8_0, split: int = 0
) -> None:
    """A small llama GGUF (three tensors); split=1 writes it as llama.cpp's NAME-0000N-of-00003.gguf set."""
    writer = gguf_pkg.GGUFWriter(str(path), "llama", split_max_tensors=split)
    writer.add_context_length(4096)
    writer.add_embedding_length(WIDTH)
    writer.add_block_count(2)
    writer.add_head_count(8)
    writer.add_head_count_kv(2)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_token_list([f"t{i}".encode() for i in range(VOCAB)])
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, WIDTH), dtype=np.float16))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((WIDTH, WIDTH), dtype=np.float16))
    writer.add_tensor("output.weight", np.zeros((VOCAB, WIDTH), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


PARAMS = 2 * VOCAB * WIDTH + WIDTH * WIDTH


def write_hf(directory: Path, config: dict[str, Any] | None = None, shards: int = 1) -> Path:
    """A Hugging Face directory: config.json and safetensors files (header and zeros), an index when sharded."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config or LLAMA_CONFIG))
    names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)] if shards > 1 else []
    for name in names or ["model.safetensors"]:
        header = json.dumps({"w": {"dtype": "BF16", "shape": [10, 20], "data_offsets": [0, 400]}}).encode()
        (directory / name).write_bytes(struct.pack("<Q", len(header)) + header + bytes(400))
    if names:
        index = {"metadata": {"total_size": 400 * shards}, "weight_map": {f"w{i}": n for i, n in enumerate(names)}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def write_ollama(store: Path, tags: dict[str, Path | None]) -> None:
    """An ollama store: manifests/registry.ollama.ai/library/MODEL/TAG naming blobs/sha256-HEX (the GGUF given, or a
    blob that is not there for None)."""
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    for tag, model in tags.items():
        name, _, tag_part = tag.partition(":")
        if model is None:
            digest, size = hashlib.sha256(tag.encode()).hexdigest(), 1000
        else:
            data = model.read_bytes()
            digest, size = hashlib.sha256(data).hexdigest(), len(data)
            (store / "blobs" / f"sha256-{digest}").write_bytes(data)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64,
                       "size": 10},
            "layers": [
                {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": size},
                {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "1" * 64, "size": 5},
            ],
        }  # fmt: skip
        folder = store / "manifests" / "registry.ollama.ai" / "library" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / tag_part).write_text(json.dumps(manifest))


@pytest.fixture
def local(example_catalog: Path) -> Cluster:
    return Cluster.objects.get(slug="local")


def by_path(result: scan.Scan) -> dict[str, add_model.Located]:
    return {m.path: m for m in result.models}


def reasons(result: scan.Scan) -> dict[str, str]:
    return {s.path: s.reason for s in result.skipped}


# --- finding ---------------------------------------------------------------------------------------------------


def test_a_gguf_file_is_a_model_named_by_its_file_less_the_quantisation(tmp_path: Path) -> None:
    write_gguf(tmp_path / "Tiny-Chat-Q8_0.gguf")
    (tmp_path / "README.md").write_text("not a model, and not worth a line")
    result = scan.scan([str(tmp_path)], LocalReader())
    (model,) = result.models
    assert (model.found.name, model.found.quant, model.found.format, model.ollama_tag) == ("Tiny-Chat", "Q8_0",
                                                                                           "gguf", "")  # fmt: skip
    assert model.path == str(tmp_path / "Tiny-Chat-Q8_0.gguf")
    assert f"{PARAMS:,} parameters" in model.found.source
    assert result.skipped == []


def test_a_split_gguf_is_one_model_at_its_first_file_with_every_shards_size_and_tensors(tmp_path: Path) -> None:
    write_gguf(tmp_path / "Big-Q8_0.gguf", split=1)
    shards = sorted(tmp_path.glob("Big-Q8_0-*-of-00003.gguf"))
    assert len(shards) == 3
    (model,) = scan.scan([str(tmp_path)], LocalReader()).models
    assert (model.found.name, model.path) == ("Big", str(shards[0]))
    assert f"{PARAMS:,} parameters" in model.found.source  # the later shards' tensors count too
    assert model.found.arch.tied_embeddings is False  # output.weight is in the third shard
    assert model.found.size_gib == round(sum(s.stat().st_size for s in shards) / 2**30, 4)
    # Naming one shard scans its whole set.
    (again,) = scan.scan([str(shards[1])], LocalReader()).models
    assert again.path == str(shards[0])


def test_a_split_gguf_with_a_missing_shard_is_skipped_with_that_reason(tmp_path: Path) -> None:
    write_gguf(tmp_path / "Big-Q8_0.gguf", split=1)
    (tmp_path / "Big-Q8_0-00002-of-00003.gguf").unlink()
    result = scan.scan([str(tmp_path)], LocalReader())
    assert result.models == []
    assert reasons(result) == {str(tmp_path / "Big-Q8_0-00001-of-00003.gguf"): "shards 00002 of 00003 are missing"}


def test_truncated_and_unlabelled_ggufs_are_skipped_with_the_reason(tmp_path: Path) -> None:
    write_gguf(tmp_path / "Whole-Q8_0.gguf")
    data = (tmp_path / "Whole-Q8_0.gguf").read_bytes()
    (tmp_path / "Cut-Q8_0.gguf").write_bytes(data[:-1000])  # a download that stopped in the weights
    (tmp_path / "Head-Q8_0.gguf").write_bytes(data[:300])  # ... or in the header
    (tmp_path / "Junk.gguf").write_bytes(b"PK\x03\x04 a zip file")
    write_gguf(tmp_path / "NoType.gguf", file_type=None)
    result = scan.scan([str(tmp_path)], LocalReader())
    assert [m.found.name for m in result.models] == ["Whole"]
    why = reasons(result)
    assert why[str(tmp_path / "Cut-Q8_0.gguf")].startswith(f"truncated: {len(data) - 1000:,} bytes")
    assert why[str(tmp_path / "Head-Q8_0.gguf")] == "truncated: the file ends inside its header, at byte 300"
    assert "not a GGUF file" in why[str(tmp_path / "Junk.gguf")]
    assert "general.file_type" in why[str(tmp_path / "NoType.gguf")]


def test_a_hugging_face_directory_is_a_model_and_one_without_weights_is_skipped(tmp_path: Path) -> None:
    write_hf(tmp_path / "org" / "Tiny-HF")
    write_hf(tmp_path / "org" / "Sharded-HF", shards=2)
    empty = tmp_path / "org" / "Config-Only"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (empty / "pytorch_model.bin").write_bytes(b"\0" * 10)
    broken = tmp_path / "org" / "Broken-Config"
    write_hf(broken)
    (broken / "config.json").write_text("{not json")
    missing = write_hf(tmp_path / "org" / "Missing-Shard", shards=2)
    (missing / "model-00002-of-00002.safetensors").unlink()
    cut = write_hf(tmp_path / "org" / "Cut-Weights")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:-100])
    result = scan.scan([str(tmp_path)], LocalReader())
    found = by_path(result)
    assert sorted(m.found.name for m in found.values()) == ["Sharded-HF", "Tiny-HF"]
    tiny = found[str(tmp_path / "org" / "Tiny-HF")].found
    assert (tiny.quant, tiny.format, tiny.arch.layers) == ("bf16", "safetensors", 2)
    assert "parameters from safetensors" in tiny.source
    why = reasons(result)
    assert why[str(empty)] == "config.json but no safetensors weights (pytorch_model.bin is not safetensors)"
    assert "config.json is not JSON" in why[str(broken)]
    assert why[str(missing)] == "weight files named in the index are missing: model-00002-of-00002.safetensors"
    assert why[str(cut)].startswith("model.safetensors is truncated")


def test_the_hugging_face_cache_names_a_snapshot_by_its_repository(tmp_path: Path) -> None:
    write_hf(tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-Tiny" / "snapshots" / "0123abcd")
    (model,) = scan.scan([str(tmp_path / "hub")], LocalReader()).models
    assert model.found.name == "SmolLM2-Tiny"


def test_an_ollama_store_gives_each_tag_a_model_at_its_gguf_blob(tmp_path: Path) -> None:
    write_gguf(tmp_path / "a.gguf", gguf_pkg.LlamaFileType.MOSTLY_Q4_0)
    write_gguf(tmp_path / "b.gguf", gguf_pkg.LlamaFileType.MOSTLY_Q8_0)
    store = tmp_path / "ollama" / "models"
    write_ollama(store, {"smollm2:135m": tmp_path / "a.gguf", "smollm2:latest": tmp_path / "a.gguf",
                         "tinyllama:1.1b-chat-q8_0": tmp_path / "b.gguf", "gone:7b": None})  # fmt: skip
    (tmp_path / "a.gguf").unlink()
    (tmp_path / "b.gguf").unlink()
    result = scan.scan([str(tmp_path)], LocalReader())
    found = {m.ollama_tag: m for m in result.models}
    assert sorted(found) == ["smollm2:135m", "tinyllama:1.1b-chat-q8_0"]
    smollm = found["smollm2:135m"]
    assert (smollm.found.name, smollm.found.quant, smollm.found.format) == ("smollm2-135m", "Q4_0", "gguf")
    assert smollm.path.startswith(f"{store}/blobs/sha256-")
    assert found["tinyllama:1.1b-chat-q8_0"].found.name == "tinyllama-1.1b-chat"  # the quantisation is the variant
    why = reasons(result)
    manifests = store / "manifests" / "registry.ollama.ai" / "library"
    assert why[str(manifests / "smollm2" / "latest")] == "the same weights as smollm2:135m"
    assert why[str(manifests / "gone" / "7b")].startswith("its model blob sha256-")
    assert why[str(manifests / "gone" / "7b")].endswith(f"is missing from {store}/blobs")


def test_the_walk_skips_hidden_directories_stops_at_its_depth_and_follows_no_link_loop(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    write_gguf(deep / "Four-Q8_0.gguf")
    (deep / "e").mkdir()
    write_gguf(deep / "e" / "Five-Q8_0.gguf")
    (tmp_path / ".cache").mkdir()
    write_gguf(tmp_path / ".cache" / "Hidden-Q8_0.gguf")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    os.symlink(tmp_path / "nowhere.gguf", tmp_path / "Dangling-Q8_0.gguf")
    os.symlink("self", tmp_path / "self")
    result = scan.scan([str(tmp_path)], LocalReader())
    assert [m.found.name for m in result.models] == ["Four"]
    why = reasons(result)
    assert why[str(deep / "e")] == "not scanned: deeper than 4 directories below the path given"
    assert why[str(tmp_path / "Dangling-Q8_0.gguf")] == "not a file (a link to nothing?)"
    assert why[str(tmp_path)] == f"{tmp_path}/self: Too many levels of symbolic links"
    assert not any("Hidden" in path or "loop" in path for path in why)


def test_bad_paths_are_refused_before_anything_is_read(tmp_path: Path) -> None:
    for bad in ("models", f"{tmp_path}/../etc", f"{tmp_path}//x", "/path with spaces", "/x;rm -rf ~", ""):
        with pytest.raises(ValidationError):
            scan.scan([bad], LocalReader())
    assert scan.check_paths([f"{tmp_path}/"]) == [str(tmp_path)]
    missing = scan.scan([f"{tmp_path}/missing"], LocalReader())
    assert reasons(missing) == {f"{tmp_path}/missing": "cannot read it: [Errno 2] No such file or directory: "
                                                       f"'{tmp_path}/missing'"}  # fmt: skip


# --- adding ----------------------------------------------------------------------------------------------------


def a_bit_of_everything(root: Path) -> None:
    (root / "gguf").mkdir(parents=True)
    write_gguf(root / "gguf" / "Tiny-Chat-Q8_0.gguf")
    write_gguf(root / "gguf" / "Big-Q8_0.gguf", split=1)
    write_hf(root / "hf" / "Tiny-Chat")  # a second variant (bf16) of the GGUF's card
    write_gguf(root / "blob.gguf", gguf_pkg.LlamaFileType.MOSTLY_Q4_0)
    write_ollama(root / "ollama", {"smollm2:135m": root / "blob.gguf"})
    (root / "blob.gguf").unlink()
    (root / "gguf" / "Cut-Q8_0.gguf").write_bytes((root / "gguf" / "Tiny-Chat-Q8_0.gguf").read_bytes()[:-10])


def test_everything_found_is_added_whole_and_a_second_scan_changes_nothing(tmp_path: Path, local: Cluster) -> None:
    a_bit_of_everything(tmp_path)
    first = add_all(scan.scan([str(tmp_path)], LocalReader()).models, local)
    assert [o.status for o in first] == ["added"] * 4, first
    card = ModelCard.objects.get(name="Tiny-Chat")
    assert sorted(card.variants.values_list("quantization", "format")) == [("Q8_0", "gguf"), ("bf16", "safetensors")]
    ollama = VariantLocation.objects.get(variant__model__name="smollm2-135m", cluster=local)
    assert ollama.ollama_tag == "smollm2:135m" and ollama.path.startswith(f"{tmp_path}/ollama/blobs/sha256-")
    big = VariantLocation.objects.get(variant__model__name="Big")
    assert big.path == str(tmp_path / "gguf" / "Big-Q8_0-00001-of-00003.gguf")
    second = scan.scan([str(tmp_path)], LocalReader())
    lines, summary = scan.report(second, add_all(second.models, local))
    assert [o.status for o in lines] == ["unchanged"] * 4 + ["skipped"]
    assert summary == "0 added, 0 updated, 4 unchanged, 1 skipped"


def test_a_changed_file_updates_its_variant_and_says_what_changed(tmp_path: Path, local: Cluster) -> None:
    write_gguf(tmp_path / "Tiny-Chat-Q8_0.gguf")
    add_all(scan.scan([str(tmp_path)], LocalReader()).models, local)
    ModelVariant.objects.filter(model__name="Tiny-Chat").update(size_gib=7)
    (outcome,) = add_all(scan.scan([str(tmp_path)], LocalReader()).models, local)
    assert outcome == Outcome("updated", outcome.what, "variant size_gib")


def test_a_dry_run_reports_what_would_be_added_and_changes_nothing(tmp_path: Path, local: Cluster) -> None:
    a_bit_of_everything(tmp_path)
    before = (ModelCard.objects.count(), ModelVariant.objects.count(), VariantLocation.objects.count())
    outcomes = add_all(scan.scan([str(tmp_path)], LocalReader()).models, local, dry_run=True)
    assert [o.status for o in outcomes] == ["added"] * 4, outcomes
    assert (ModelCard.objects.count(), ModelVariant.objects.count(), VariantLocation.objects.count()) == before


def test_a_model_the_catalog_refuses_is_skipped_whole_and_the_rest_are_added(tmp_path: Path, local: Cluster) -> None:
    write_gguf(tmp_path / "Good-Q8_0.gguf")
    write_gguf(tmp_path / "Bad-Q8_0.gguf")
    found = scan.scan([str(tmp_path)], LocalReader()).models
    too_long = replace(found[0], found=replace(found[0].found, name="x" * 200))
    outcomes = add_all([too_long, found[1]], local)
    assert [o.status for o in outcomes] == ["skipped", "added"]
    assert "at most 120 characters" in outcomes[0].detail
    assert not ModelVariant.objects.filter(model__name="x" * 200).exists()
    assert ModelCard.objects.filter(name="Good").exists()


# --- the SSH reader's commands, run by a local shell -------------------------------------------------------------


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SSH reader's commands run by a local shell (as the account this test runs as); the list of them."""
    ran: list[str] = []

    def run_here(target: Any, command: str, timeout_s: float = 0, max_output_bytes: int = 1 << 20) -> ssh.CommandResult:
        ran.append(command)
        done = subprocess.run(["sh", "-c", command], capture_output=True, timeout=60)
        out, err = done.stdout, done.stderr.decode(errors="replace")
        return ssh.CommandResult(done.returncode, out[:max_output_bytes].decode(errors="replace"), err,
                                 len(out) > max_output_bytes)  # fmt: skip

    monkeypatch.setattr(ssh.pool, "run", run_here)
    return ran


def test_the_ssh_reader_lists_and_reads_like_the_local_one(tmp_path: Path, commands: list[str]) -> None:
    a_bit_of_everything(tmp_path)
    os.symlink(tmp_path, tmp_path / "gguf" / "loop")
    over_ssh = scan.scan([str(tmp_path)], SSHReader(target=None))  # type: ignore[arg-type]
    here = scan.scan([str(tmp_path)], LocalReader())
    assert over_ssh.models == here.models
    assert reasons(over_ssh) == reasons(here)
    listings = [c for c in commands if c.startswith("find ")]
    assert len(listings) == len({c for c in listings})  # one listing per directory, none twice
    with pytest.raises(OSError, match="No such file"):
        SSHReader(target=None).listing(f"{tmp_path}/missing", 10)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        SSHReader(target=None).prefix("/x'; touch /tmp/pwned; '", 10)  # type: ignore[arg-type]


# --- links: followed only where nobody else could have put the files -----------------------------------------------

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another uid needs root")
NOBODY = 65534


def elsewhere(tmp_path: Path, name: str, mode: int, uid: int | None = None) -> Path:
    """A directory outside the scanned one holding a model NAME-Q8_0.gguf, with that mode (and owner)."""
    directory = tmp_path / "elsewhere" / name
    directory.mkdir(parents=True)
    write_gguf(directory / f"{name}-Q8_0.gguf")
    directory.chmod(mode)
    if uid is not None:
        os.chown(directory, uid, uid)
    return directory


def planted(tmp_path: Path) -> Path:
    """A models folder with a model of its own and links out of it: to folders others can write, and to one that
    only its owner can (followed)."""
    models = tmp_path / "models"
    (models / "own").mkdir(parents=True)
    write_gguf(models / "own" / "Own-Q8_0.gguf")
    (models / "open").symlink_to(elsewhere(tmp_path, "Open", 0o777))
    (models / "sticky").symlink_to(elsewhere(tmp_path, "Sticky", 0o1777))
    (models / "group").symlink_to(elsewhere(tmp_path, "Group", 0o775))
    (models / "fine").symlink_to(elsewhere(tmp_path, "Fine", 0o755))
    loose = tmp_path / "elsewhere" / "Loose-Q8_0.gguf"  # a file anyone may rewrite
    write_gguf(loose)
    loose.chmod(0o666)
    (models / "Loose-Q8_0.gguf").symlink_to(loose)
    return models


LINK_REASONS = {
    "open": "not followed: a link to a directory its group or others can write (mode 777)",
    "sticky": "not followed: a link to a directory its group or others can write (mode 1777)",
    "group": "not followed: a link to a directory its group or others can write (mode 775)",
    "Loose-Q8_0.gguf": "not followed: a link to a file its group or others can write (mode 666)",
}


def test_a_scan_follows_no_link_into_a_directory_or_file_others_can_write(tmp_path: Path) -> None:
    models = planted(tmp_path)
    result = scan.scan([str(models)], LocalReader())
    assert sorted(m.found.name for m in result.models) == ["Fine", "Own"]
    assert reasons(result) == {str(models / name): why for name, why in LINK_REASONS.items()}


def test_the_ssh_reader_follows_the_same_links_as_the_local_one(tmp_path: Path, commands: list[str]) -> None:
    models = planted(tmp_path)
    over_ssh = scan.scan([str(models)], SSHReader(target=None))  # type: ignore[arg-type]
    here = scan.scan([str(models)], LocalReader())
    assert over_ssh.models == here.models and reasons(over_ssh) == reasons(here)
    assert sorted(m.found.name for m in over_ssh.models) == ["Fine", "Own"]
    assert [shlex.split(c)[3] for c in commands].count("uid") == 1  # the account's uid, asked once a scan


@as_root
def test_a_link_to_another_users_directory_is_not_followed(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "theirs").symlink_to(elsewhere(tmp_path, "Theirs", 0o755, uid=NOBODY))
    result = scan.scan([str(models)], LocalReader())
    assert result.models == []
    why = f"a link to a directory of uid {NOBODY} (not root, the scanning account or the directory's owner)"
    assert reasons(result) == {str(models / "theirs"): f"not followed: {why}"}


@as_root
def test_a_link_is_followed_to_what_the_owner_of_its_directory_owns(tmp_path: Path) -> None:
    # A lab's folder, owned by the lab's account: links inside it to its own other folders are the lab's own doing.
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "current").symlink_to(elsewhere(tmp_path, "Lab", 0o755, uid=NOBODY))
    os.chown(lab, NOBODY, NOBODY)
    result = scan.scan([str(lab)], LocalReader())
    assert [m.found.name for m in result.models] == ["Lab"] and result.skipped == []


def test_the_ssh_readers_listing_says_which_entries_are_links_their_owner_and_mode(
    tmp_path: Path, commands: list[str]
) -> None:
    (tmp_path / "sticky").mkdir()
    (tmp_path / "sticky").chmod(0o1777)
    (tmp_path / "to-sticky").symlink_to(tmp_path / "sticky")
    (tmp_path / "nowhere").symlink_to(tmp_path / "missing")
    listing = SSHReader(target=None).listing(str(tmp_path), 10)  # type: ignore[arg-type]
    entries = {e.name: (e.kind, e.link, e.uid, e.mode) for e in listing.children}
    uid = os.geteuid()
    assert entries == {"sticky": ("dir", False, uid, 0o1777), "to-sticky": ("dir", True, uid, 0o1777),
                       "nowhere": ("link", True, uid, 0o777)}  # fmt: skip
    assert listing.entry.link is False and listing.entry.uid == uid
    here = LocalReader().listing(str(tmp_path), 10).children
    assert {e.name: (e.kind, e.link, e.uid, e.mode) for e in here if e.kind == "dir"} == {
        name: entries[name] for name in ("sticky", "to-sticky")
    }


def test_the_ssh_reader_refuses_a_listing_it_cannot_read_field_by_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record without the link mark, owner and mode (an older find's, or anything else) is not guessed at."""
    records = {
        "old": "0\td\t4096\t1.0\t1:2\tmodels\0",
        "no mark": "?\t0\td\t4096\t1.0\t1:2\t0\t755\tmodels\0",
        "bad mode": "-\t0\td\t4096\t1.0\t1:2\t0\t9z\tmodels\0",
    }
    for out in records.values():
        monkeypatch.setattr(ssh.pool, "run", lambda *args, out=out, **kwargs: ssh.CommandResult(0, out, "", False))
        with pytest.raises((OSError, ValueError)):
            SSHReader(target=None).listing("/models", 10)  # type: ignore[arg-type]
    good = "-\t0\td\t4096\t1.0\t1:2\t0\t755\tmodels\0l\t1\tf\t9\t1.0\t1:3\t1000\t644\ta\tb.gguf\0"
    monkeypatch.setattr(ssh.pool, "run", lambda *args, **kwargs: ssh.CommandResult(0, good, "", False))
    listing = SSHReader(target=None).listing("/models", 10)  # type: ignore[arg-type]
    assert listing.entry == add_model.Entry("models", "dir", 4096, 1.0, "1:2", False, 0, 0o755)
    assert listing.children == [add_model.Entry("a\tb.gguf", "file", 9, 1.0, "1:3", True, 1000, 0o644)]


# --- the command and the admin -----------------------------------------------------------------------------------


@pytest.fixture
def reads_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster's files are this machine's (the account's SSH is the e2e tests' business)."""
    monkeypatch.setattr("catalog.management.commands.catalog.cluster_reader", lambda user, cluster: LocalReader())
    monkeypatch.setattr("catalog.admin.cluster_reader", lambda user, cluster: LocalReader())


def test_the_command_prints_a_line_per_model_and_a_summary(
    tmp_path: Path, local: Cluster, owner: Any, reads_here: None
) -> None:
    a_bit_of_everything(tmp_path)
    dry = StringIO()
    call_command("catalog", "scan", "local", str(tmp_path), "--user", "ada", "--dry-run", stdout=dry)
    assert "Dry run (4 added, 0 updated, 0 unchanged, 1 skipped)" in dry.getvalue()
    assert not ModelCard.objects.filter(name="Big").exists()
    out = StringIO()
    call_command("catalog", "scan", "local", str(tmp_path), "--user", "ada", stdout=out)
    text = out.getvalue()
    big = f"{tmp_path}/gguf/Big-Q8_0-00001-of-00003.gguf"
    assert f"added     Big Q8_0 (gguf, 0.0001 GiB) at {big}: model card Big, variant Q8_0, location on local" in text
    assert f"skipped   {tmp_path}/gguf/Cut-Q8_0.gguf: truncated:" in text
    assert "(ollama smollm2:135m)" in text
    assert f"{local.name}: 4 added, 0 updated, 0 unchanged, 1 skipped." in text
    with pytest.raises(CommandError, match="there is no cluster"):
        call_command("catalog", "scan", "nowhere", str(tmp_path), "--user", "ada")
    with pytest.raises(CommandError, match="absolute path"):
        call_command("catalog", "scan", "local", "relative/dir", "--user", "ada")


def test_the_clusters_admin_page_previews_a_scan_then_applies_it(
    tmp_path: Path, local: Cluster, admin_client: Client, reads_here: None
) -> None:
    a_bit_of_everything(tmp_path)
    url = f"/admin/catalog/cluster/{local.pk}/scan/"
    assert url.encode() in admin_client.get(f"/admin/catalog/cluster/{local.pk}/change/").content
    form = admin_client.get(url)
    assert form.status_code == 200 and b'name="paths"' in form.content
    preview = admin_client.post(url, {"paths": f"{tmp_path}\n", "preview": "Preview"})
    assert preview.status_code == 200
    assert b"Preview: nothing was changed (4 added, 0 updated, 0 unchanged, 1 skipped)" in preview.content
    assert not ModelCard.objects.filter(name="Big").exists()
    applied = admin_client.post(url, {"paths": f"{tmp_path}\n", "apply": "Apply"})
    assert b"Applied (4 added" in applied.content
    assert VariantLocation.objects.filter(variant__model__name="Big", cluster=local).exists()
    bad = admin_client.post(url, {"paths": "relative/dir", "preview": "Preview"})
    assert bad.status_code == 200 and b"absolute path" in bad.content


def test_only_staff_who_may_change_the_cluster_may_scan_it(
    local: Cluster, staff_user: Any, client: Client, reads_here: None
) -> None:
    client.force_login(staff_user)
    reply = client.post(f"/admin/catalog/cluster/{local.pk}/scan/", {"paths": "/tmp", "apply": "Apply"})
    assert reply.status_code == 302 and reply["Location"] == "/admin/catalog/cluster/"
