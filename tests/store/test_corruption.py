"""A flipped byte or a truncated block file is caught, and the error names the block and the file."""

from __future__ import annotations

import os

import pytest
from tiny_models import tiny_model

import zo2tier
from zo2tier.store.blockstore import BlockStore, StoreCorruptError
from zo2tier.store.format import read_manifest

BIG = {"device": "1GiB", "host": "1GiB", "disk": "1GiB"}


@pytest.fixture
def store(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "hf")
    zo2tier.convert(tmp_path / "hf", tmp_path / "store", progress=False)
    return tmp_path / "store"


def _victim(store):
    entry = read_manifest(str(store)).blocks[2]
    return entry.name, os.path.join(store, entry.file)


def test_flipped_byte_names_block_and_file(store):
    name, path = _victim(store)
    with open(path, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(StoreCorruptError) as err:  # every block is read (and checked) to place it
        zo2tier.ZOEngine.from_store(store, budget=BIG)
    assert name in str(err.value) and path in str(err.value) and "checksum" in str(err.value)
    # the store itself opens (sizes are fine) but the read fails
    with BlockStore.open(store) as s, pytest.raises(StoreCorruptError, match=name):
        s.read_bytes(2)


def test_flipped_byte_on_disk_tier_read(store):
    name, path = _victim(store)
    names = [b.name for b in read_manifest(str(store)).blocks[:-1]]
    engine = zo2tier.ZOEngine.from_store(store, budget=BIG, placement={n: "disk" for n in names})
    with open(path, "r+b") as f:
        f.seek(7)
        b = f.read(1)
        f.seek(7)
        f.write(bytes([b[0] ^ 0x80]))
    from tiny_models import tiny_batch

    with pytest.raises(StoreCorruptError) as err:
        engine.step(tiny_batch())
    assert name in str(err.value) and path in str(err.value)


def test_truncated_file_fails_on_open(store):
    name, path = _victim(store)
    os.truncate(path, os.path.getsize(path) - 10)
    with pytest.raises(StoreCorruptError) as err:
        BlockStore.open(store)
    assert name in str(err.value) and path in str(err.value) and "truncated" in str(err.value)
    with pytest.raises(StoreCorruptError, match="truncated"):
        zo2tier.ZOEngine.from_store(store, budget=BIG)


def test_reconvert_repairs_a_damaged_block(store, tmp_path):
    _name, path = _victim(store)
    os.truncate(path, 5)
    r = zo2tier.convert(tmp_path / "hf", store, progress=False)
    assert r.n_written == 1
    BlockStore.open(store).close()


def test_convert_rerun_is_idempotent(store, tmp_path):
    before = sorted(os.listdir(store))
    r = zo2tier.convert(tmp_path / "hf", store, progress=False)
    assert r.n_written == 0 and sorted(os.listdir(store)) == before
    with pytest.raises(ValueError, match="other options"):
        zo2tier.convert(tmp_path / "hf", store, dtype="bf16", progress=False)
