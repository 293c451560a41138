"""Shared helpers for the fault tests (issue 8): a tiny engine, a fault-free reference, file-size caps."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import signal

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import zo2tier

BIG = {"device": "1GiB", "host": "1GiB", "disk": "1GiB"}
CFG = zo2tier.MeZOConfig(lr=1e-3, eps=1e-3, weight_decay=0.01, seed=3)


def all_on_disk(model) -> dict[str, str]:
    return {name: "disk" for name in zo2tier.ZOEngine.block_names(model)}


def spread(model) -> dict[str, str]:
    tiers = ("device", "host", "disk", "disk")
    return {name: tiers[i % 4] for i, name in enumerate(zo2tier.ZOEngine.block_names(model))}


def disk_engine(disk_dir, placement=all_on_disk, **kw) -> zo2tier.ZOEngine:
    model = tiny_model("llama")
    return zo2tier.ZOEngine(model, budget=BIG, disk_dir=disk_dir, config=CFG, placement=placement(model), **kw)


@functools.cache
def _reference(n_steps: int) -> tuple[tuple[float, ...], dict[str, torch.Tensor]]:
    with zo2tier.ZOEngine(tiny_model("llama"), budget=BIG, config=CFG) as engine:  # every block on the device
        losses = tuple(engine.step(tiny_batch()).loss_plus for _ in range(n_steps))
        return losses, engine.state_dict()


def assert_matches_reference(engine: zo2tier.ZOEngine) -> None:
    """The engine's weights equal a fault-free all-on-device run of as many steps, bit for bit."""
    _, want = _reference(len(engine.log))
    got = engine.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def reference_losses(n_steps: int) -> tuple[float, ...]:
    return _reference(n_steps)[0]


@contextlib.contextmanager
def file_size_cap(n_bytes: int):
    """RLIMIT_FSIZE for this process: writes past ``n_bytes`` fail with EFBIG (SIGXFSZ ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


@contextlib.contextmanager
def tmpfs(path, size: str, *, read_only: bool = False):
    """Mount a size-capped tmpfs at ``path`` (skips the test where mounting is not allowed)."""
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o {opts} tmpfs {path} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield str(path)
    finally:
        os.system(f"umount -l {path}")


def store_files(directory) -> dict[str, bytes]:
    """Every file in ``directory`` but the lock and marker, with its bytes."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith(".zo2tier"):
            continue
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.fixture
def batch():
    return tiny_batch()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and far faster on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
