"""Hostlists (portal/slurm/hostlist.py) read as Slurm 22.05's `scontrol show hostnames` read them on the local
cluster (tests/portal/data/slurm/hostnames.jsonl), and the cases where the two old parsers disagreed."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal.slurm.errors import SlurmParseError
from portal.slurm.hostlist import MAX_RANGE, expand_hostlist
from tests.portal.slurm.data import cases, hostnames_expected, hostnames_of

RECORDED = cases("hostnames.jsonl")


@pytest.mark.parametrize("case", RECORDED, ids=[repr(case["input"]) for case in RECORDED])
def test_hostlists_expand_to_what_slurm_printed_or_are_refused_where_slurm_refused(case: dict[str, Any]) -> None:
    names = hostnames_expected(case["input"], case["stdout"], case["stderr"])
    if names is None:
        with pytest.raises(SlurmParseError):
            expand_hostlist(case["input"])
    else:
        assert expand_hostlist(case["input"]) == names


def test_the_recording_has_each_kind_of_tricky_list() -> None:
    refused = [case["input"] for case in RECORDED if hostnames_of(case["stdout"], case["stderr"]) is None]
    assert {"node[1-2]-ib", "node[3-1]", "node[a-b]", "n[0-65536]"} <= set(refused)
    assert {"rack[1-2]-node[1-2]", "n[9-010]", "node[1,3,5-6]", "n1 n2"} <= {case["input"] for case in RECORDED}


def test_a_suffix_after_the_last_bracket_is_refused_as_slurm_22_05_refuses_it() -> None:
    # jobs/cluster/slurm.py read node1-ib, node2-ib; catalog/inventory.py read node1, node2 and a node "-ib".
    with pytest.raises(SlurmParseError, match="last bracket"):
        expand_hostlist("node[1-2]-ib")
    assert expand_hostlist("rack[1-2]-node[1-2]") == ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2"]


def test_malformed_lists_are_refused_rather_than_read_as_other_names() -> None:
    # inventory read node[3-1] as no nodes and crashed with a bare ValueError on node[a-b].
    for text in ("node[3-1]", "node[a-b]", "node[]", "n[1-2]]", "n[1-2;x", "n[1-2", "n]1", f"n[1-{MAX_RANGE + 1}]"):
        with pytest.raises(SlurmParseError):
            expand_hostlist(text)


def test_names_keep_slurms_order_padding_and_duplicates() -> None:
    # inventory returned a set: no order, duplicates gone.
    assert expand_hostlist("n[1-3],n2") == ["n1", "n2", "n3", "n2"]
    assert expand_hostlist("g[08-10],c1") == ["g08", "g09", "g10", "c1"]
    assert expand_hostlist("a[1-2]b[3-4]c[5-6]")[:5] == ["a1b3c5", "a1b3c6", "a2b3c5", "a2b3c6", "a1b4c5"]


def test_slurms_words_for_no_nodes_are_no_nodes() -> None:
    for text in ("", "(null)", "None assigned", " "):
        assert expand_hostlist(text) == []


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z]", fullmatch=True),
            st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 20), st.integers(1, 4)), min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_bracketed_ranges_expand_to_each_number_zero_padded(groups: list[Any]) -> None:
    text, names = [], []
    for prefix, ranges in groups:
        parts = []
        for low, length, width in ranges:
            high = low + length
            parts.append(f"{low:0{width}d}-{high}")
            names += [f"{prefix}{number:0{width}d}" for number in range(low, high + 1)]
        text.append(f"{prefix}[{','.join(parts)}]")
    assert expand_hostlist(",".join(text)) == names


@given(st.text(max_size=200))
def test_anything_expands_or_raises_the_librarys_own_error(text: str) -> None:
    with contextlib.suppress(SlurmParseError):
        names = expand_hostlist(text)
        assert all(name and "[" not in name and "]" not in name for name in names)


@given(st.text(alphabet="n0123456789[]-,", max_size=30))
def test_lists_made_of_brackets_digits_and_commas_never_fail_otherwise(text: str) -> None:
    with contextlib.suppress(SlurmParseError):
        expand_hostlist(text)
