"""The trainer's decisions (jobs/cluster/scripts/finetune.py), on the portal's Python: its heavy libraries are
imported only where it trains, which the e2e tests run on the local cluster."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from jobs.cluster.jobscript import SCRIPTS_DIR

_spec = importlib.util.spec_from_file_location("finetune_trainer", SCRIPTS_DIR / "finetune.py")
assert _spec and _spec.loader
trainer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trainer)


def test_precision_follows_the_gpu_and_a_node_without_cuda_computes_in_fp32() -> None:
    assert trainer.precision_for("bf16", cuda=True, bf16_supported=True) == "bf16"
    assert trainer.precision_for("bf16", cuda=True, bf16_supported=False) == "fp16"  # a V100 after all
    assert trainer.precision_for("fp16", cuda=True, bf16_supported=True) == "fp16"
    assert trainer.precision_for("bf16", cuda=False, bf16_supported=False) == "fp32"


def test_qlora_stops_with_the_reason_where_it_cannot_run_and_never_falls_back() -> None:
    with pytest.raises(trainer.Failure, match="needs a CUDA GPU"):
        trainer.check_method("qlora", cuda=False, bitsandbytes=False)
    with pytest.raises(trainer.Failure, match="does not have"):
        trainer.check_method("qlora", cuda=True, bitsandbytes=False)
    trainer.check_method("qlora", cuda=True, bitsandbytes=True)
    trainer.check_method("lora", cuda=False, bitsandbytes=False)


def test_the_newest_whole_checkpoint_is_resumed_and_torn_ones_are_removed(tmp_path: Path) -> None:
    def checkpoint(step: int, whole: bool = True) -> Path:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "optimizer.pt").write_bytes(b"x")
        if whole:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        return folder

    assert trainer.last_checkpoint(str(tmp_path / "none")) is None
    checkpoint(3)
    six = checkpoint(6)
    torn = checkpoint(9, whole=False)  # killed mid-save: no state yet
    (tmp_path / "checkpoint-x").mkdir()
    assert trainer.last_checkpoint(str(tmp_path)) == (str(six), 6)
    assert not torn.exists() and (tmp_path / "checkpoint-3").exists()


def test_the_settings_file_must_be_the_portals(tmp_path: Path) -> None:
    settings: dict[str, Any] = {name: 1 for name in trainer.SETTINGS}
    settings.update(run="r", parent="", method="lora", target_modules="all", precision="bf16", data_format="chat",
                    gradient_checkpointing=False, learning_rate=1e-4, lora_dropout=0.0)  # fmt: skip
    path = tmp_path / "finetune.json"
    path.write_text(json.dumps(settings))
    assert trainer.read_settings(str(path))["method"] == "lora"
    path.write_text(json.dumps({**settings, "parent": PARENT}))
    assert trainer.read_settings(str(path))["parent"] == PARENT
    without_parent = {k: v for k, v in settings.items() if k != "parent"}
    for bad in ({**settings, "method": "rm -rf"}, {**settings, "extra": 1}, {**settings, "planned_steps": True},
                without_parent, {**settings, "parent": "../../etc"}, {**settings, "parent": 1},
                {**settings, "parent": PARENT, "method": "full"}):  # fmt: skip
        path.write_text(json.dumps(bad))
        with pytest.raises(trainer.Failure):
            trainer.read_settings(str(path))


PARENT = "0b4e3a52-6f4c-4f7e-9a43-7d1c2b9e8f10"


def test_a_run_with_a_parent_starts_from_its_adapter_unless_it_goes_on_from_its_own_checkpoint(
    tmp_path: Path,
) -> None:
    adapter = tmp_path / "sessions" / PARENT / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    settings = {"parent": PARENT}
    assert trainer.adapter_source(settings, str(adapter), None) == str(adapter)
    own = (str(tmp_path / "checkpoints" / "checkpoint-4"), 4)
    assert trainer.adapter_source(settings, str(adapter), own) == own[0]  # a requeued run goes on from its own steps
    assert trainer.adapter_source({"parent": ""}, "", None) is None  # a new adapter


def test_the_parent_adapter_the_job_names_must_be_the_settings_parent_and_be_there(tmp_path: Path) -> None:
    adapter = tmp_path / "sessions" / PARENT / "adapter"
    with pytest.raises(trainer.Failure, match="is not in"):
        trainer.adapter_source({"parent": PARENT}, str(adapter), None)  # trained, then removed from the home
    cases = [({"parent": PARENT}, ""), ({"parent": ""}, str(adapter)),
             ({"parent": PARENT}, str(tmp_path / "sessions" / "another" / "adapter"))]  # fmt: skip
    for settings, named in cases:
        with pytest.raises(trainer.Failure, match=r"parent|another run"):
            trainer.adapter_source(settings, named, None)


def test_the_loss_curve_is_thinned_to_a_bound_and_keeps_the_last_step() -> None:
    history = [{"step": s, "loss": 10 / s} for s in range(1, 1001)] + [{"step": 1000, "eval_loss": 0.5}]
    points = trainer.curve(history)
    assert len(points) == trainer.MAX_POINTS and points[0][0] == 1 and points[-1] == [1000, 0.01, 0.5]
