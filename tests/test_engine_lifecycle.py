"""A failed ZOEngine.__init__ leaves nothing behind: no I/O threads, no claimed disk_dir."""

import threading

import pytest
from tiny_models import tiny_batch, tiny_model

import zo2tier
from zo2tier.model.loading import in_memory_source

BIG = {"device": "1GiB", "host": "1GiB", "disk": "1GiB"}


class _Broken:
    """A weight source that fails on the third tensor, after the tiers have started their threads."""

    def __init__(self, model):
        self._inner = in_memory_source(model)
        self.calls = 0

    def get(self, name):
        self.calls += 1
        if self.calls == 3:
            raise OSError("simulated read error in the checkpoint")
        return self._inner.get(name)

    def buffer_keys(self):
        return self._inner.buffer_keys()


def _io_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("zo2tier-")]


def test_failed_init_stops_its_threads_and_releases_the_disk_dir(tmp_path):
    before = _io_threads()
    model = tiny_model("llama")
    place = {b: "disk" for b in zo2tier.ZOEngine.block_names(model)}
    with pytest.raises(OSError, match="simulated read error"):
        zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, placement=place, _source=_Broken(model))
    assert _io_threads() == before
    model = tiny_model("llama")  # the directory is free again: a new engine claims it
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, placement=place) as engine:
        r = engine.step(tiny_batch())
        assert r.loss_plus > 0 and engine.placement == place
