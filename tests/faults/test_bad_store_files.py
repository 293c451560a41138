"""Issue 8, item 3: truncated, corrupted, missing or foreign files in a store, and a manifest of an unknown
version. Each error names the file, the block and the fix; nothing is read past the damage."""

from __future__ import annotations

import json
import os

import pytest
from conftest import disk_engine

from zo2tier.store import format as store_format
from zo2tier.store.io import BlockIOError

BLOCK = "model.layers.1"


def _block_file(engine, name=BLOCK) -> str:
    record = next(r for r in engine.table if r.name == name)
    engine.tiers.drain()
    return record.path


def _damage_then_step(tmp_path, batch, damage):
    engine = disk_engine(tmp_path / "store")
    engine.step(batch)
    path = _block_file(engine)
    damage(path)
    with pytest.raises((BlockIOError, ValueError)) as info:  # BlockIOError, or the store's StoreCorruptError
        for _ in range(2):  # the damaged block may already be in flight from the last step
            engine.step(batch)
    return engine, path, str(info.value)


def _assert_names_everything(message, path):
    assert BLOCK in message and path in message
    assert "restore" in message  # the fix


def test_truncated_block_file(tmp_path, batch):
    def truncate(path):
        os.truncate(path, os.path.getsize(path) // 2)

    _, path, message = _damage_then_step(tmp_path, batch, truncate)
    _assert_names_everything(message, path)
    assert "is truncated" in message  # (the tmp_path itself contains "truncated")


def test_missing_block_file(tmp_path, batch):
    _, path, message = _damage_then_step(tmp_path, batch, os.unlink)
    _assert_names_everything(message, path)
    assert "is missing" in message


def test_corrupted_block_file(tmp_path, batch):
    """A flipped byte is caught by the store's checksum (issue 5's manifest carries xxh3 per block)."""
    def flip(path):
        with open(path, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))

    _, path, message = _damage_then_step(tmp_path, batch, flip)
    _assert_names_everything(message, path)
    assert "fails its checksum" in message


def test_unknown_manifest_version(tmp_path, batch):
    store = tmp_path / "store"
    engine = disk_engine(store)
    engine.step(batch)
    engine.close()
    manifest = store / store_format.MANIFEST
    data = json.loads(manifest.read_text())
    data["version"] = store_format.VERSION + 98
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        store_format.read_manifest(str(store))
    message = str(info.value)
    assert str(manifest) in message and str(store_format.VERSION + 98) in message
    assert "upgrade zo2tier or re-convert" in message
