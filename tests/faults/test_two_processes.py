"""Issue 8, item 8: a second process on the same store gets a clear lock error; the lock of a process that
was killed (SIGKILL, so no clean-up ran) is dropped by the kernel and the store can be taken safely."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import disk_engine

import zo2tier
from zo2tier.tiers.store_dir import claim_disk_dir, release_disk_dir

_HOLDER = """
import sys, time
from zo2tier.tiers.store_dir import claim_disk_dir
claim_disk_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_second_process_is_refused_and_stale_lock_is_cleared(tmp_path):
    store = str(tmp_path / "store")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, store], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(os.listdir(store))
        with pytest.raises(zo2tier.StoreLockedError) as info:
            disk_engine(store)
        message = str(info.value)
        assert store in message and f"pid {holder.pid}" in message and "wait for it" in message
        assert sorted(os.listdir(store)) == before  # refused before writing anything

        holder.send_signal(signal.SIGKILL)  # dies holding the lock: no clean-up runs
        holder.wait(timeout=30)
        with open(os.path.join(store, ".zo2tier.lock")) as f:
            assert f.read().strip() == str(holder.pid)  # the stale lock file is still there ...
        assert claim_disk_dir(store) == store  # ... but its flock died with the process
        with open(os.path.join(store, ".zo2tier.lock")) as f:
            assert f.read().strip() == str(os.getpid())
        release_disk_dir(store)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
