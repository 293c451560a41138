"""Issue 8, item 6: when pinning a staging chunk fails, smaller chunks are tried, then pageable memory with
one warning; the engine never crashes for it. Pinning is faked (CPU-only torch cannot pin)."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from conftest import assert_matches_reference, disk_engine

from zo2tier.store import io
from zo2tier.store.io import ALIGN_BYTES, PinnedPool
from zo2tier.tiers.manager import TierManager

MiB = 2**20


class FakePinning:
    """Stands in for page-locked allocation: fails above ``limit_bytes`` (None: always fails)."""

    def __init__(self, limit_bytes: int | None):
        self.limit_bytes = limit_bytes
        self.asked: list[int] = []

    def __call__(self, n_bytes: int) -> torch.Tensor:
        self.asked.append(n_bytes)
        if self.limit_bytes is None or n_bytes > self.limit_bytes:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return io.aligned_empty(n_bytes)  # page-aligned, as pinned and registered memory is


def fake_pinning(monkeypatch, limit_bytes: int | None) -> FakePinning:
    """Fake both ways of pinning: torch's pinned allocator and cudaHostRegister (exact chunks)."""
    fake = FakePinning(limit_bytes)
    monkeypatch.setattr(io, "_pin_alloc", fake)
    monkeypatch.setattr(io, "_register_alloc", fake)
    monkeypatch.setattr(io, "unregister", lambda buf: None)
    return fake


def _pin_warnings(caplog) -> int:
    return sum("could not pin" in r.getMessage() for r in caplog.records)


def test_one_chunk_when_pinning_works(monkeypatch):
    fake = FakePinning(limit_bytes=64 * MiB)
    monkeypatch.setattr(io, "_pin_alloc", fake)
    pool = PinnedPool(pin=True, chunk_bytes=8 * MiB)
    bufs = [pool.take(MiB + 5) for _ in range(6)]
    assert len(fake.asked) == 1 and pool.pin and pool.pageable_bytes == 0
    assert all(b.data_ptr() % ALIGN_BYTES == 0 and b.numel() == io.align_up(MiB + 5) for b in bufs)
    ptrs = sorted(b.data_ptr() for b in bufs)
    assert all(q - p >= io.align_up(MiB + 5) for p, q in itertools.pairwise(ptrs))  # disjoint


def test_halves_the_chunk_until_pinning_succeeds(monkeypatch, caplog):
    fake = FakePinning(limit_bytes=3 * MiB)
    monkeypatch.setattr(io, "_pin_alloc", fake)
    pool = PinnedPool(pin=True, chunk_bytes=16 * MiB)
    with caplog.at_level(logging.WARNING, logger="zo2tier"):
        bufs = [pool.take(MiB) for _ in range(8)]
    assert pool.pin and pool.pageable_bytes == 0 and _pin_warnings(caplog) == 0
    assert pool.chunk_bytes == 2 * MiB  # 16 -> 8 -> 4 -> 2 MiB, the first size under the limit
    assert max(fake.asked) > 3 * MiB and all(n <= 3 * MiB for n in fake.asked[-3:])
    assert len({b.data_ptr() for b in bufs}) == 8


def test_falls_back_to_pageable_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(io, "_pin_alloc", FakePinning(limit_bytes=None))
    pool = PinnedPool(pin=True, chunk_bytes=4 * MiB)
    with caplog.at_level(logging.WARNING, logger="zo2tier"):
        bufs = [pool.take(MiB) for _ in range(10)]
    assert not pool.pin and pool.pageable_bytes == 10 * MiB
    assert _pin_warnings(caplog) == 1
    assert all(b.data_ptr() % ALIGN_BYTES == 0 for b in bufs)


@pytest.mark.parametrize("limit_bytes", [None, 64 * 1024])
def test_engine_runs_on_when_pinning_fails(monkeypatch, caplog, tmp_path, batch, limit_bytes):
    fake_pinning(monkeypatch, limit_bytes)
    real_open = TierManager.open

    def open_pinned(self):
        self._pin = True  # as on a CUDA machine
        return real_open(self)

    monkeypatch.setattr(TierManager, "open", open_pinned)
    with caplog.at_level(logging.WARNING, logger="zo2tier"):
        engine = disk_engine(tmp_path / "store")
        for _ in range(2):
            engine.step(batch)
    assert _pin_warnings(caplog) == (1 if limit_bytes is None else 0)
    assert_matches_reference(engine)
    engine.close()


def test_exact_chunks_hold_whole_buffers_and_no_more(monkeypatch):
    """exact=True (the CUDA host tier): chunks are whole multiples of the buffer size, the last one only
    what is still to come, so the pinned bytes are the buffers' bytes."""
    fake = fake_pinning(monkeypatch, limit_bytes=64 * MiB)
    size = 3 * MiB + ALIGN_BYTES
    pool = PinnedPool(pin=True, chunk_bytes=16 * MiB, total_bytes=7 * size, exact=True)
    bufs = [pool.take(size) for _ in range(7)]
    assert fake.asked == [5 * size, 2 * size]  # 5 fit in 16 MiB; the last chunk holds the 2 left
    assert pool.pinned_bytes == 7 * size and pool.pageable_bytes == 0
    ptrs = sorted(b.data_ptr() for b in bufs)
    assert all(q - p >= size for p, q in itertools.pairwise(ptrs))  # disjoint
    pool.close()
