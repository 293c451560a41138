"""Issue 8, item 7: a disk read that fails with EIO or returns short is retried a bounded number of times,
then raises an error naming the block; transient faults are survived, bit for bit, and a failing read never
loses a staging buffer (which would hang the next step)."""

from __future__ import annotations

import errno
import faulthandler
import logging
import os
import threading

import pytest
from conftest import assert_matches_reference, disk_engine

from zo2tier.store import io
from zo2tier.store.io import BlockIOError

_real_preadv = os.preadv


class FlakyPreadv:
    """``os.preadv`` that fails: ``mode`` 'eio' raises EIO, 'short' reads at most ``short_bytes``, 'zero' reads 0.

    ``fail_every``: each read attempt at a fresh (fd, offset) fails ``fail_every`` times before it succeeds;
    None fails forever.
    """

    def __init__(self, mode: str, fail_every: int | None, short_bytes: int = 4096):
        self.mode, self.fail_every, self.short_bytes = mode, fail_every, short_bytes
        self.calls = 0
        self._failures: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def __call__(self, fd, buffers, offset):
        with self._lock:
            self.calls += 1
            n = self._failures.get((fd, offset), 0)
            fail = self.fail_every is None or n < self.fail_every
            if fail:
                self._failures[(fd, offset)] = n + 1
        if not fail:
            return _real_preadv(fd, buffers, offset)
        if self.mode == "eio":
            raise OSError(errno.EIO, "Input/output error")
        if self.mode == "zero":
            return 0
        first = memoryview(buffers[0])[: self.short_bytes]  # a short read: fewer bytes than asked
        return _real_preadv(fd, [first], offset)


@pytest.fixture(autouse=True)
def _hang_guard():
    faulthandler.dump_traceback_later(90, exit=True)  # a lost staging buffer would block forever
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize(("mode", "fail_every"), [("eio", io.READ_RETRIES), ("zero", 2), ("short", 1)])
def test_transient_faults_are_retried(monkeypatch, caplog, tmp_path, batch, mode, fail_every):
    engine = disk_engine(tmp_path / "store")
    engine.step(batch)
    engine.tiers.drain()
    flaky = FlakyPreadv(mode, fail_every)
    monkeypatch.setattr(os, "preadv", flaky)
    with caplog.at_level(logging.WARNING, logger="zo2tier"):
        for _ in range(2):
            engine.step(batch)
    monkeypatch.setattr(os, "preadv", _real_preadv)
    assert flaky.calls > 0
    if mode != "short":  # a short read that made progress is simply continued
        assert any("attempt" in r.getMessage() and "model.layers." in r.getMessage() for r in caplog.records)
    assert_matches_reference(engine)
    engine.close()


def test_persistent_eio_raises_naming_the_block_then_recovers(monkeypatch, tmp_path, batch):
    """Only block 2's file fails, so blocks 0 and 1 arrive and prefetch it each step: every failed prefetch
    must hand its staging buffer back, or after a few steps the pool is empty and the engine hangs."""
    engine = disk_engine(tmp_path / "store")
    engine.step(batch)
    engine.tiers.drain()
    flaky = FlakyPreadv("eio", None)

    def fail_block_2(fd, buffers, offset):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("block_00002"):
            return flaky(fd, buffers, offset)
        return _real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", fail_block_2)
    for _ in range(engine.tiers.lookahead_blocks + 3):  # more failures than there are staging buffers
        with pytest.raises(BlockIOError) as info:
            engine.step(batch)
        message = str(info.value)
        assert "block model.layers.2" in message and str(tmp_path / "store") in message
        assert f"after {io.READ_RETRIES} retries" in message and "restore the store" in message
    assert flaky.calls >= (io.READ_RETRIES + 1) * (engine.tiers.lookahead_blocks + 3)
    monkeypatch.setattr(os, "preadv", _real_preadv)  # the drive is back
    engine.step(batch)
    assert_matches_reference(engine)
    engine.close()
