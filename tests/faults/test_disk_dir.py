"""Issue 8, item 2: a disk_dir that cannot be used is refused with a ValueError before any work starts.

Root ignores permission bits, and these tests usually run as root. So the permission cases drop the
effective uid to ``nobody`` for the duration of the check (they run as they are when not root), and the
other cases use faults root cannot bypass: a file where the directory should be, and a read-only mount.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import pytest
from conftest import BIG, CFG, all_on_disk, tmpfs
from tiny_models import tiny_model

import zo2tier

NOBODY = 65534


@pytest.fixture
def engine_args(monkeypatch):
    """Keyword arguments for an all-on-disk engine whose construction fails loudly if work starts."""
    def no_work(*args, **kwargs):
        raise AssertionError("the engine started loading blocks before checking disk_dir")

    monkeypatch.setattr(zo2tier.ZOEngine, "_build", no_work)
    model = tiny_model("llama")
    return {"model": model, "budget": BIG, "config": CFG, "placement": all_on_disk(model)}


def build(engine_args, disk_dir):
    args = dict(engine_args)
    return zo2tier.ZOEngine(args.pop("model"), disk_dir=disk_dir, **args)


@contextlib.contextmanager
def as_nobody():
    """Run the block with euid/egid ``nobody`` if we are root (so permission bits apply); else as is."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def shared_tmp():
    """A directory that ``nobody`` can traverse (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix="zo2tier-faults-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_file_instead_of_directory(engine_args, tmp_path):
    target = tmp_path / "disk"
    target.write_bytes(b"user data")
    with pytest.raises(ValueError, match="disk_dir .* (is not a directory|cannot be created)"):
        build(engine_args, target)
    assert target.read_bytes() == b"user data"


def test_parent_is_a_file(engine_args, tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ValueError, match="cannot be created .*pick a writable directory"):
        build(engine_args, tmp_path / "file" / "disk")


def test_read_only_mount(engine_args, tmp_path):
    with tmpfs(tmp_path / "ro", "64k", read_only=True) as mnt:
        with pytest.raises(ValueError, match="not readable and writable|cannot be created"):
            build(engine_args, mnt)
        with pytest.raises(ValueError, match="cannot be created"):
            build(engine_args, os.path.join(mnt, "sub"))


def test_directory_without_write_permission(engine_args, shared_tmp):
    disk = os.path.join(shared_tmp, "disk")
    os.mkdir(disk)
    os.chmod(disk, 0o555)
    with (
        as_nobody(),
        pytest.raises(ValueError, match="not readable and writable by this user; fix its permissions"),
    ):
        build(engine_args, disk)


def test_directory_without_read_permission(engine_args, shared_tmp):
    disk = os.path.join(shared_tmp, "disk")
    os.mkdir(disk)
    os.chmod(disk, 0o333)
    with as_nobody(), pytest.raises(ValueError, match="not readable and writable"):
        build(engine_args, disk)


def test_read_only_files_of_another_user(engine_args, shared_tmp):
    """A store left by another user: its lock and marker files are read-only to us."""
    disk = os.path.join(shared_tmp, "disk")
    os.mkdir(disk)
    os.chmod(disk, 0o777)  # writable by us, but the files in it are not ours
    for name in (".zo2tier-disk", ".zo2tier.lock"):
        with open(os.path.join(disk, name), "w") as f:
            f.write("0")
        os.chmod(os.path.join(disk, name), 0o444)
    if os.geteuid() != 0:
        pytest.skip("needs root to make files owned by another user")
    with (
        as_nobody(),
        pytest.raises(ValueError, match="lock file cannot be opened .*fix its owner/permissions"),
    ):
        build(engine_args, disk)


def test_foreign_files_are_refused(engine_args, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "thesis.tex").write_text("do not touch")
    with pytest.raises(ValueError, match="thesis.tex.*zo2tier never deletes files it did not create"):
        build(engine_args, disk)
    assert (disk / "thesis.tex").read_text() == "do not touch"
