"""GRES strings and MIG profiles (portal/slurm/gres.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal.slurm.gres import Gres, gpu_counts, parse_gres, parse_mig_profile


@pytest.mark.parametrize(
    ("text", "gpus"),
    [
        ("gpu:a100:2", {"a100": 2}),  # scontrol's Gres= on the local cluster
        ("gpu:a100:0(IDX:N/A)", {"a100": 0}),  # sinfo's GresUsed on the local cluster, idle
        ("gpu:a100:2(S:0-1),shard:a100:8(S:0-1),gpu:h100:1", {"a100": 2, "h100": 1}),
        ("gpu:a100:2(IDX:0,2)", {"a100": 2}),  # a comma inside the parentheses
        ("gpu:a100:1(S:0),gpu:a100:1(S:1)", {"a100": 2}),  # one type named twice is one count
        ("gpu:4", {"": 4}),
        ("gpu", {"": 1}),
        ("gpu:a100", {"a100": 1}),
        ("gres:gpu:a100:2", {"a100": 2}),  # squeue's %b in 22.05
        ("gres/gpu:h100:1", {"h100": 1}),
        ("gres/gpu:h100=3,gres/gpu=1", {"h100": 3, "": 1}),  # the TRES forms
        ("gpu:a100:no_consume:2", {"a100": 2}),
        ("gpu:nvidia_a100_3g.20gb:7(S:0)", {"nvidia_a100_3g.20gb": 7}),
        ("(null)", {}),
        ("N/A", {}),
        ("", {}),
        ("shard:8,mps:100", {}),
        ("gpu:a100:lots", {}),
    ],
)
def test_gres_strings_of_every_shape_give_the_gpus_by_type(text: str, gpus: dict[str, int]) -> None:
    assert gpu_counts(text) == gpus


def test_other_gres_are_read_too_with_slurms_count_suffixes() -> None:
    assert parse_gres("gpu:a100:2(S:0-1),shard:8,bandwidth:lustre:no_consume:4G") == [
        Gres("gpu", "a100", 2),
        Gres("shard", "", 8),
        Gres("bandwidth", "lustre", 4 * 1024**3),
    ]


def test_the_two_old_readers_disagreed_where_this_one_reads_each_item_whole() -> None:
    # catalog/inventory.py split at every comma: "(IDX:0,2)" became an untyped GPU of count 0, and a type named twice
    # made two groups of one node each; jobs/cluster/slurm.py summed them.
    assert gpu_counts("gpu:a100:2(IDX:0,2)") == {"a100": 2}
    assert gpu_counts("gpu:a100:1(S:0),gpu:a100:1(S:1)") == {"a100": 2}


@pytest.mark.parametrize(
    ("gres_type", "profile"),
    [
        ("1g.10gb", ("", None, 1, 10, "1g.10gb")),
        ("a100_3g.20gb", ("a100", None, 3, 20, "3g.20gb")),
        ("nvidia_h100_80gb_hbm3_2g.20gb", ("nvidia_h100_80gb_hbm3", None, 2, 20, "2g.20gb")),
        ("A100-1C.3G.20GB", ("a100", 1, 3, 20, "1c.3g.20gb")),
    ],
)
def test_mig_profiles_are_read_from_gres_types(gres_type: str, profile: tuple[object, ...]) -> None:
    found = parse_mig_profile(gres_type)
    assert found is not None
    assert (found.gpu, found.compute_slices, found.gpu_slices, found.memory_gb, found.name) == profile


@pytest.mark.parametrize("gres_type", ["a100", "a100_80gb", "h100-94g", "3g", "g.20gb", ""])
def test_gpu_names_are_no_mig_profiles(gres_type: str) -> None:
    assert parse_mig_profile(gres_type) is None


@given(st.text(max_size=200))
def test_any_text_gives_gres_items_without_failing(text: str) -> None:
    for gres in parse_gres(text):
        assert gres.name and gres.count >= 0
    gpu_counts(text)
    parse_mig_profile(text)
