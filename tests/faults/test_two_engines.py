"""A second engine in the same process on a live disk_dir is refused (the flock of test_two_processes.py
cannot see it: both are one process). Before, it was let in, and its first commit deleted the first
engine's block files."""

from __future__ import annotations

import os

import pytest
from conftest import assert_matches_reference, disk_engine, reference_losses, spread
from tiny_models import tiny_batch

import zo2tier
from zo2tier.store.blockstore import BlockStore


def test_second_engine_on_a_live_disk_dir_is_refused(tmp_path):
    store = str(tmp_path / "store")
    first = disk_engine(store, placement=spread)
    first.step(tiny_batch())
    before = sorted(os.listdir(store))
    with pytest.raises(zo2tier.StoreLockedError) as info:
        disk_engine(store, placement=spread)
    message = str(info.value)
    assert store in message and "close" in message and "another disk_dir" in message
    assert sorted(os.listdir(store)) == before  # refused before writing anything

    losses = [first.step(tiny_batch()).loss_plus]  # the first engine trains on ...
    assert tuple(losses) == reference_losses(2)[1:]
    assert_matches_reference(first)
    first.close()  # ... and closes cleanly: every file its manifest names is there
    with BlockStore.open(store) as reopened:
        for entry in reopened.entries:
            reopened.check_size(entry)
        assert reopened.manifest.step == 2

    with disk_engine(store, placement=spread) as again:  # closed: the directory can be claimed again
        again.step(tiny_batch())


def test_second_open_of_an_engines_store_is_refused(tmp_path):
    """ZOEngine.from_store and BlockStore.open on the directory of a live engine: refused the same way."""
    store = str(tmp_path / "store")
    with disk_engine(store) as first:
        first.step(tiny_batch())
        with pytest.raises(zo2tier.StoreLockedError, match="close"):
            zo2tier.ZOEngine.from_store(store, budget="device=1GiB,host=1GiB,disk=1GiB")
        with pytest.raises(zo2tier.StoreLockedError, match="close"):
            BlockStore.open(store)
        first.step(tiny_batch())
        assert_matches_reference(first)
    with zo2tier.ZOEngine.from_store(store, budget="device=1GiB,host=1GiB,disk=1GiB") as reopened:
        assert len(reopened.log) == 2  # the engine that owns a store it opens claims it once, not twice
        reopened.step(tiny_batch())
