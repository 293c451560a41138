"""Issue 8, item 9: property tests. The size parser, the budget parser, the placement planner and the store
manifest loader raise only their documented exception (ValueError; StoreFormatError for manifests) on any
input, and every example finishes within the deadline (no hang).

Each "raises only" test would also pass if the function rejected everything, so each has a partner that draws
only valid inputs and checks they are accepted, with the right value.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zo2tier.budget import TIERS, TierBudget, parse_size
from zo2tier.plan import DTYPE_BYTES, BlockSize, PlanInput, block_bytes, plan_placement, working_bytes
from zo2tier.store import format as store_format

FUZZ = settings(max_examples=100, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow],
                database=None)

size_text = st.one_of(
    st.text(max_size=30),
    st.from_regex(r"\s*-?[0-9]{0,30}(\.[0-9]{0,5})?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB|gib|xB)?\s*", fullmatch=True),
)
size_value = st.one_of(size_text, st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.none(),
                       st.booleans())


@FUZZ
@given(size_value)
def test_parse_size_raises_only_value_error(value):
    try:
        n = parse_size(value)
    except ValueError:
        return
    assert isinstance(n, int) and 0 <= n < 2**63


FACTORS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 10**3, "MB": 10**6,
           "GB": 10**9, "TB": 10**12}
blank = st.sampled_from(["", " ", "  ", "\t"])


@FUZZ
@given(st.integers(min_value=0, max_value=2**32), st.sampled_from(["", "B", "KiB", "MiB", "GiB", "KB", "GB"]))
def test_parse_size_is_exact(number, unit):
    assert parse_size(f"{number}{unit}") == number * FACTORS[unit]


@FUZZ
@given(st.integers(min_value=0, max_value=2**20), st.integers(min_value=0, max_value=999), st.sampled_from(sorted(FACTORS)),
       st.booleans(), blank, blank, blank)
def test_parse_size_accepts_every_valid_spelling(whole, thousandths, unit, lower, lead, mid, trail):
    """Decimals, any letter case, blanks around and between: all accepted, rounded down to whole bytes."""
    text = f"{lead}{whole}.{thousandths:03d}{mid}{unit.lower() if lower else unit}{trail}"
    assert parse_size(text) == (whole * 1000 + thousandths) * FACTORS[unit] // 1000
    assert parse_size(whole) == whole


budget_mapping = st.dictionaries(st.one_of(st.sampled_from(TIERS + ("gpu", "cpu")), st.text(max_size=5)),
                                 size_value, max_size=4)
budget_string = st.lists(st.tuples(st.sampled_from(TIERS + ("nvme", "")), st.sampled_from(["=", "", "=="]),
                                   size_text), max_size=4).map(lambda parts: ",".join(k + s + v for k, s, v in parts))


@FUZZ
@given(st.one_of(budget_mapping, budget_string, st.text(max_size=40), st.integers(), st.none()))
def test_budget_parse_raises_only_value_error(budget):
    try:
        parsed = TierBudget.parse(budget)
    except ValueError:
        return
    assert all(0 <= parsed.of(t) < 2**63 for t in TIERS)


valid_budget = st.fixed_dictionaries(
    {"device": st.tuples(st.integers(min_value=0, max_value=2**20), st.sampled_from(sorted(FACTORS)))},
    optional={t: st.tuples(st.integers(min_value=0, max_value=2**20), st.sampled_from(sorted(FACTORS)))
              for t in ("host", "disk")})


@FUZZ
@given(valid_budget, st.booleans())
def test_budget_parse_accepts_every_valid_budget(sizes, as_string):
    """A dict of tier -> size, or its CLI spelling "device=8GiB,host=..."; a tier left out gets 0 bytes."""
    texts = {t: f"{n}{unit}" for t, (n, unit) in sizes.items()}
    parsed = TierBudget.parse(",".join(f"{t}={v}" for t, v in texts.items()) if as_string else texts)
    for t in TIERS:
        n, unit = sizes.get(t, (0, ""))
        assert parsed.of(t) == n * FACTORS[unit]


plan_inputs = st.builds(
    PlanInput,
    blocks=st.lists(st.integers(min_value=0, max_value=2**34), max_size=12).map(
        lambda ns: tuple(BlockSize(f"layers.{i}", n) for i, n in enumerate(ns))),
    resident_numel=st.integers(min_value=0, max_value=2**34),
    compute_bytes=st.sampled_from([2, 4]),
    storage=st.fixed_dictionaries({t: st.sampled_from(sorted(DTYPE_BYTES) + ["fp8"]) for t in TIERS}),
    lookahead_blocks=st.integers(min_value=0, max_value=4),
)
budgets = st.builds(TierBudget, *(st.integers(min_value=0, max_value=2**45) for _ in TIERS))


@FUZZ
@given(plan_inputs, budgets, st.none() | st.dictionaries(st.text(max_size=9), st.text(max_size=7), max_size=4))
def test_plan_placement_raises_only_value_error(inp, budget, override):
    try:
        plan = plan_placement(inp, budget, override)
    except ValueError:
        return
    assert set(plan.placement) == {b.name for b in inp.blocks}
    assert all(plan.used_bytes[t] <= budget.of(t) for t in TIERS)  # a plan it returns always fits


valid_plan_inputs = st.builds(
    PlanInput,
    blocks=st.lists(st.integers(min_value=1, max_value=2**34), min_size=1, max_size=12).map(
        lambda ns: tuple(BlockSize(f"layers.{i}", n) for i, n in enumerate(ns))),
    resident_numel=st.integers(min_value=0, max_value=2**34),
    compute_bytes=st.sampled_from([2, 4]),
    storage=st.fixed_dictionaries({t: st.sampled_from(sorted(DTYPE_BYTES)) for t in TIERS}),
    lookahead_blocks=st.integers(min_value=0, max_value=4),
)


@FUZZ
@given(valid_plan_inputs, st.integers(min_value=0, max_value=2**40))
def test_plan_placement_places_whenever_the_tiers_can_hold_it(inp, host_bytes):
    """Device room for the resident set and every working buffer, and a disk that holds every block: a plan
    always exists (whatever the host budget) and the planner must find one."""
    n = len(inp.blocks)
    device = block_bytes(inp.resident_numel, inp.storage["device"]) + working_bytes(inp, n, n)
    disk = sum(block_bytes(b.numel, inp.storage["disk"]) for b in inp.blocks)
    budget = TierBudget(device, host_bytes, disk)
    plan = plan_placement(inp, budget)
    assert set(plan.placement) == {b.name for b in inp.blocks}
    assert all(plan.used_bytes[t] <= budget.of(t) for t in TIERS)


def _valid_manifest_json() -> dict:
    return {
        "format": store_format.FORMAT, "version": store_format.VERSION, "config": {"model_type": "llama"},
        "dtype": "fp32", "step": 1, "log": [[0, 123, 0.5, 1e-3, 0.0]], "log_start": 0,
        "perturbation": "gaussian", "complete": True, "source": {},
        "blocks": [{"index": 0, "name": "model.layers.0", "file": "block_00000_g000001.bin", "offset": 0,
                    "numel": 16, "dtype": "fp32", "applied_steps": 0, "xxh3_64": "0" * 16,
                    "tensors": [{"name": "model.layers.0.w", "shape": [4, 4], "offset": 0, "numel": 16,
                                 "param_id": 0, "decay": True}]}],
    }


def _mutations(value, draw_index):
    """Values to put in place of ``value``: wrong types, wrong sizes, nothing."""
    return [None, "", "x", -1, 2**70, 1.5, float("nan"), [], {}, [value], {"k": value}, True][draw_index]


def test_manifest_loader_reads_the_valid_manifest(tmp_path):
    """The document the mutation test starts from loads: its mutants fail for the mutation, not for a typo."""
    (tmp_path / store_format.MANIFEST).write_text(json.dumps(_valid_manifest_json()))
    manifest = store_format.read_manifest(str(tmp_path))
    assert manifest.step == 1 and manifest.complete and manifest.perturbation == "gaussian"
    assert [b.name for b in manifest.blocks] == ["model.layers.0"]
    assert [(t.name, t.numel) for t in manifest.blocks[0].tensors] == [("model.layers.0.w", 16)]


@FUZZ
@given(data=st.binary(max_size=300))
def test_manifest_loader_on_random_bytes(tmp_path_factory, data):
    directory = tmp_path_factory.mktemp("m")
    (directory / store_format.MANIFEST).write_bytes(data)
    with pytest.raises(store_format.StoreFormatError):
        store_format.read_manifest(str(directory))


@FUZZ
@given(st.data())
def test_manifest_loader_on_mutated_manifests(tmp_path_factory, data):
    doc = _valid_manifest_json()
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):  # mutate 1-3 places, maybe nested
        node, paths = doc, []
        while isinstance(node, (dict, list)) and node:
            key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            paths.append((node, key))
            node = node[key]
            if data.draw(st.booleans()):
                break
        parent, key = paths[-1]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = _mutations(node, data.draw(st.integers(min_value=0, max_value=11)))
    directory = tmp_path_factory.mktemp("m")
    (directory / store_format.MANIFEST).write_text(json.dumps(doc))
    try:
        store_format.read_manifest(str(directory))
    except store_format.StoreFormatError:
        pass
