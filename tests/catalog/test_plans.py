"""Plans over the example catalog, and the estimate command."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from catalog.models import ModelVariant
from catalog.plans import plans, request_for, smallest_per_gpu_type


def variant(model: str, quant: str) -> ModelVariant:
    return ModelVariant.objects.select_related("model").get(model__name=model, quantization=quant)


def test_the_lab_splits_reflection_q4_k_s_over_two_machines(example_catalog: Path) -> None:
    v = variant("Reflection-Llama-3.1-70B", "Q4_K_S")
    options = plans(request_for(v, "llama.cpp", 8192, flash_attn=False), v)
    lab = [o for o in options if o.node_group.partition.cluster.slug == "lab"]
    assert {(o.node_group.gpu_type.name, o.nodes, o.fit.fits) for o in lab} == {
        ("rtx4090", 2, True),
        ("rtx3090ti", 2, True),
    }
    assert all(len(o.estimate.per_gpu_gib) == 2 for o in lab)


def test_q6_k_l_needs_three_machines_so_only_the_three_3090s_fit(example_catalog: Path) -> None:
    v = variant("Reflection-Llama-3.1-70B", "Q6_K_L")
    options = plans(request_for(v, "llama.cpp", 8192, flash_attn=False), v)
    lab = {o.node_group.gpu_type.name: o for o in options if o.node_group.partition.cluster.slug == "lab"}
    assert (lab["rtx3090ti"].nodes, lab["rtx3090ti"].fit.fits) == (3, True)
    assert lab["rtx4090"].fit.fits is False and lab["rtx4090"].fit.headroom_gib < 0
    assert options.index(lab["rtx3090ti"]) < options.index(lab["rtx4090"])  # fitting options come first


def test_options_list_the_smallest_fit_per_gpu_type_first(example_catalog: Path) -> None:
    v = variant("Llama-3.1-70B-Instruct", "Q4_K_M")
    options = plans(request_for(v, "llama.cpp", 8192), v, available_only=False)
    fitting = [o for o in options if o.fit.fits]
    assert fitting and [o.gpus for o in fitting] == sorted(o.gpus for o in fitting)
    smallest = smallest_per_gpu_type(options)
    assert len({o.node_group.gpu_type.name for o in smallest}) == len(smallest)
    h200 = next(o for o in smallest if o.node_group.gpu_type.name == "h200")
    assert h200.gpus == 1  # 40 GiB of weights fit one 141 GB card


def test_the_estimate_command_prints_the_documented_json(example_catalog: Path) -> None:
    out = StringIO()
    call_command(
        "estimate", "--model", "Reflection-Llama-3.1-70B", "--quant", "Q6_K_L", "--runtime", "llama.cpp",
        "--context", "8192", "--flash-attn", "off", "--gpu", "rtx3090ti", "--json", stdout=out,
    )  # fmt: skip
    data = json.loads(out.getvalue())
    expected = {"weights_gib", "kv_cache_gib", "compute_gib", "overhead_gib", "total_gib", "per_gpu_gib"}
    assert expected | {"fits", "headroom_gib", "min_gpus", "min_nodes"} <= set(data)
    assert (data["fits"], data["min_gpus"], data["min_nodes"]) == (False, 3, 3)
    parts = data["weights_gib"] + data["kv_cache_gib"] + data["compute_gib"] + data["overhead_gib"]
    assert data["total_gib"] == pytest.approx(parts, abs=0.01)


def test_the_estimate_command_takes_explicit_numbers_and_an_ad_hoc_gpu(db: None) -> None:
    out = StringIO()
    call_command(
        "estimate", "--params-b", "6.74", "--layers", "32", "--hidden-size", "4096", "--attention-heads", "32",
        "--kv-heads", "32", "--head-dim", "128", "--vocab-size", "32000", "--quant", "fp16",
        "--runtime", "transformers", "--context", "2048", "--gpu-gib", "16", "--json", stdout=out,
    )  # fmt: skip
    data = json.loads(out.getvalue())
    assert data["fits"] is True and data["min_gpus"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "Llama-3.1-8B-Instruct", "--kv-type", "q8_0", "--flash-attn", "off"], "needs flash attention"),
        (["--model", "Llama-3.1-8B-Instruct", "--context", "999999"], "above the model's maximum"),
        (["--model", "Llama-3.1-8B-Instruct", "--quant", "Q9"], "unknown quantisation"),
        (["--model", "Nope"], "no model 'Nope'"),
        (["--params-b", "7"], "give --model NAME, or all of"),
    ],
)
def test_the_estimate_command_refuses_bad_combinations(example_catalog: Path, args: list[str], message: str) -> None:
    base = {"--runtime": "llama.cpp", "--context": "4096"}
    for flag, value in base.items():
        if flag not in args:
            args = [*args, flag, value]
    with pytest.raises(CommandError, match=message):
        call_command("estimate", *args, stdout=StringIO())


def test_the_estimate_command_sizes_fine_tuning_with_its_parts(example_catalog: Path) -> None:
    args = ["--model", "Llama-3.1-8B-Instruct", "--quant", "bf16", "--runtime", "transformers", "--context", "2048"]
    out = StringIO()
    call_command("estimate", *args, "--purpose", "qlora", "--gpu", "rtx3090", "--json", stdout=out)
    qlora = json.loads(out.getvalue())
    assert qlora["adapters_gib"] > 0 and qlora["optimizer_states_gib"] == pytest.approx(2 * qlora["gradients_gib"])
    assert qlora["fits"] is True and qlora["min_gpus"] == 1
    out = StringIO()
    call_command("estimate", *args, "--purpose", "full", "--gpu", "rtx3090", "--json", stdout=out)
    full = json.loads(out.getvalue())
    assert full["total_gib"] > 3 * qlora["total_gib"] and full["fits"] is False
    with pytest.raises(CommandError, match="transformers runtime"):
        call_command("estimate", *args[:4], "--runtime", "vllm", "--context", "2048", "--purpose", "lora")
