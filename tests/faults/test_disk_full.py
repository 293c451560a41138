"""Issue 8, item 1: a full disk during write-back and during store creation.

The error names the store and the bytes needed; the store keeps its last consistent copies (no partial
``.tmp`` left); no logged update is lost; training goes on, bit for bit, once space is freed.
"""

from __future__ import annotations

import errno
import fcntl
import os

import pytest
from conftest import (
    assert_matches_reference,
    disk_engine,
    file_size_cap,
    reference_losses,
    store_files,
    tmpfs,
)

from zo2tier.store.convert import convert
from zo2tier.store.io import BlockIOError, align_up

CAP_BYTES = 4096  # smaller than one block file of the tiny model (~37 KB)


def _no_tmp(directory) -> None:
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_write_back_file_size_cap_then_resume(tmp_path, batch):
    disk_dir = tmp_path / "store"
    engine = disk_engine(disk_dir)
    for _ in range(2):
        engine.step(batch)
    engine.tiers.drain()
    before = store_files(disk_dir)
    applied = [r.applied_steps for r in engine.table if r.tier == "disk"]

    with file_size_cap(CAP_BYTES):
        engine.step(batch)  # its write-backs fail on the writer threads ...
        with pytest.raises(BlockIOError) as info:
            engine.step(batch)  # ... and the next read of such a block raises
        with pytest.raises(BlockIOError):
            engine.close()  # close cannot write either: it raises and the engine stays open

    message = str(info.value)
    assert info.value.errno == errno.EFBIG
    assert str(disk_dir) in message and "needs" in message and "bytes" in message
    needed = int(message.split("needs ")[1].split(" bytes")[0])
    stored = engine.table[0].stored_bytes
    assert needed in (stored, align_up(stored))  # O_DIRECT writes the block padded to 4 KiB
    assert store_files(disk_dir) == before  # last consistent copies, nothing half-written
    _no_tmp(disk_dir)
    assert [r.applied_steps for r in engine.table if r.tier == "disk"] == applied  # not marked written: the log still has them
    assert len(engine.log) == 3

    results = [engine.step(batch) for _ in range(2)]  # space is back: training resumes
    assert [r.loss_plus for r in results] == list(reference_losses(5)[3:])
    assert_matches_reference(engine)
    engine.close()


def test_write_back_real_enospc_on_small_tmpfs(tmp_path, batch):
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        disk_dir = os.path.join(mnt, "store")
        engine = disk_engine(disk_dir)
        engine.step(batch)
        engine.tiers.drain()
        before = store_files(disk_dir)
        filler = os.path.join(mnt, "filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill the file system to the last byte
            while os.write(fd, b"\0" * 4096) > 0:
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        engine.step(batch)
        with pytest.raises(BlockIOError) as info:
            engine.step(batch)
        assert info.value.errno == errno.ENOSPC
        assert disk_dir in str(info.value) and "bytes" in str(info.value)
        assert store_files(disk_dir) == before
        _no_tmp(disk_dir)
        os.unlink(filler)  # free the space
        engine.step(batch)
        assert_matches_reference(engine)
        engine.close()


def test_store_creation_on_full_disk_names_store_and_releases_lock(tmp_path):
    disk_dir = tmp_path / "store"
    with file_size_cap(CAP_BYTES), pytest.raises(BlockIOError) as info:
        disk_engine(disk_dir)
    assert str(disk_dir) in str(info.value) and "needs" in str(info.value)
    _no_tmp(disk_dir)
    fd = os.open(disk_dir / ".zo2tier.lock", os.O_RDWR)  # a failed start must not keep the store locked
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    engine = disk_engine(disk_dir)  # and once space is there, the same directory works
    engine.close()


def _tiny_config_file(directory) -> str:
    from tiny_models import tiny_config

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "config.json")
    tiny_config("llama").to_json_file(path)
    return path


def test_convert_on_full_disk_then_resume(tmp_path):
    src = _tiny_config_file(tmp_path / "src")
    dst = tmp_path / "store"
    with file_size_cap(CAP_BYTES), pytest.raises(BlockIOError) as info:
        convert(src, dst, progress=False)
    message = str(info.value)
    assert str(dst) in message and "needs" in message and "bytes" in message
    _no_tmp(dst)
    report = convert(src, dst, progress=False)  # space is back: the same command finishes the store
    assert report.n_blocks == 5
    _no_tmp(dst)


def test_convert_fills_a_small_tmpfs_then_resumes(tmp_path):
    src = _tiny_config_file(tmp_path / "src")
    with tmpfs(tmp_path / "mnt", "100k") as mnt:
        dst = os.path.join(mnt, "store")
        with pytest.raises(BlockIOError) as info:
            convert(src, dst, progress=False)
        assert info.value.errno == errno.ENOSPC and dst in str(info.value) and "bytes" in str(info.value)
        _no_tmp(dst)
        assert os.system(f"mount -o remount,size=2m {mnt}") == 0  # space is freed
        report = convert(src, dst, progress=False)
        assert 0 < report.n_written < report.n_blocks  # the blocks written before the fault were kept
        _no_tmp(dst)
