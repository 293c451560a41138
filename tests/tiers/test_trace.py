"""ZOEngine.trace(): a Chrome trace with a compute lane and one lane per disk reader/writer thread."""

from __future__ import annotations

import json
import time

import pytest
from tiny_models import tiny_batch, tiny_model

import zo2tier
from zo2tier.tiers.manager import TierManager


def _engine(tmp_path):
    model = tiny_model("llama", seed=0)
    names = zo2tier.ZOEngine.block_names(model)
    placement = {b: ("host", "disk")[i % 2] for i, b in enumerate(names)}
    return zo2tier.ZOEngine(model, budget="device=1GiB,host=1GiB,disk=1GiB", disk_dir=tmp_path / "disk",
                            device="cpu", config=zo2tier.MeZOConfig(lr=1e-3, eps=1e-3, seed=0),
                            placement=placement, write_back_every=1)


@pytest.mark.parametrize("read_delay", [0.0, 0.1])
def test_trace_lanes_and_order(tmp_path, monkeypatch, read_delay):
    """With slow reads (``read_delay`` s each) the step waits for the disk: the wait is not drawn as compute."""
    slow = TierManager._read_file

    def read_file(self, record, staging):
        time.sleep(read_delay)
        slow(self, record, staging)

    monkeypatch.setattr(TierManager, "_read_file", read_file)
    path = tmp_path / "trace.json"
    with _engine(tmp_path) as engine:
        engine.step(tiny_batch())  # warm: the first step reads cold
        with engine.trace(path) as timeline:
            for _ in range(2):
                engine.step(tiny_batch())
        disk = [r.name for r in engine.table if r.tier == "disk"]
    events = json.loads(path.read_text())["traceEvents"]
    lanes = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    spans = [dict(e, lane=lanes[e["tid"]]) for e in events if e["ph"] == "X"]
    assert timeline.events()  # the handle stays readable after export
    assert all(s["dur"] >= 0 and s["ts"] >= 0 for s in spans)
    by_lane = {}
    for s in spans:
        by_lane.setdefault(s["lane"].split(" zo2tier")[0], []).append(s)
    assert set(by_lane) >= {"compute", "disk read", "disk write"}
    # every block, the resident set included, computes twice per step (forward per step) -> at least 2 spans
    computed = [s["name"] for s in by_lane["compute"]]
    for name in disk:
        assert computed.count(name) >= 2
        reads = sorted((s for s in by_lane["disk read"] if s["name"] == name), key=lambda s: s["ts"])
        writes = [s for s in by_lane["disk write"] if s["name"] == name]
        assert reads and writes
        # the data dependency: a block computes only with its bytes at hand, and its next read starts once
        # the visit is over, so no compute span of a block overlaps a read of it (a wait is not compute)
        computes = [s for s in by_lane["compute"] if s["name"] == name]
        for r in reads:
            for c in computes:
                assert r["ts"] + r["dur"] <= c["ts"] + 1.0 or c["ts"] + c["dur"] <= r["ts"] + 1.0, (r, c)
    assert all(s["lane"].startswith(("disk read zo2tier-read", "disk write zo2tier-write", "compute"))
               for s in spans)


def test_trace_does_not_nest(tmp_path):
    with _engine(tmp_path) as engine:
        with (
            engine.trace(tmp_path / "a.json"),
            pytest.raises(RuntimeError, match="nest"),
            engine.trace(tmp_path / "b.json"),
        ):
            pass
        r = engine.step(tiny_batch())  # tracing off again: runs as before
        assert engine.timeline is None and engine.tiers.timeline is None
    assert (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()
    with _engine(tmp_path / "untraced") as plain:  # the traced engine's step is the plain one's, exactly
        want = plain.step(tiny_batch())
    assert (r.loss_plus, r.loss_minus, r.projected_grad) == (want.loss_plus, want.loss_minus, want.projected_grad)
