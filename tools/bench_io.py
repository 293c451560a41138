"""Disk I/O back-ends, side by side: read and write GB/s on one disk; prints ONE JSON line.

    python tools/bench_io.py --dir=/tmp/zo2tier-bench-io --total-gib=8 --block-mib=256 \
        --threads=1,2,4,8,16 --cgroup-cap-gib=4 --calibration-out=runs/calibration.json

Back-ends (see docs/io.md, "Disk I/O back-ends"):

* ``raw``: O_DIRECT ``os.preadv``/``os.pwritev`` of whole blocks into 4 KiB-aligned buffers
  (``zo2tier.store.io.BlockFile`` and ``aligned_empty``), one buffer per thread, 1..16 threads. Also a
  ``raw_mixed`` pass: half the threads read while the other half write (the write-back steady state).
* ``tensorstore``: zarr3, one shard per block (``sharding_indexed``, inner chunks of ``--ts-inner-mib``),
  with and without zstd, under the file kvstore's context options ``file_io_mode`` (default / direct /
  memmap) and ``file_io_sync`` (fsync per file on / off).
* ``aiofiles``: asyncio tasks, each with its own file handle (``seek`` + ``readinto``/``write``), on
  the raw file, buffered and with O_DIRECT.
* ``mmap``: ``numpy.memmap`` of the raw file, each block copied into a staging buffer (reads) or copied
  in and ``flush``-ed (writes). Measured last, inside a fresh cgroup v2 with ``memory.max`` =
  ``--cgroup-cap-gib`` when that is possible (root, cgroup v2 with the memory controller), so that the
  page cache cannot hold the file; otherwise skipped with a note (``--mmap-uncapped=1`` runs it anyway).

Every timed write ends with its data on disk (fsync, msync or a final ``os.sync``), so buffered back-ends
are not credited with page-cache speed. Before every timed read the page cache is emptied:
``echo 3 > /proc/sys/vm/drop_caches`` when permitted, else ``posix_fadvise(DONTNEED)`` on each file; the
record says which. GB is 10**9 bytes.

With ``--calibration-out=PATH`` it also writes ``{"disk_read_gbps", "disk_write_gbps", "h2d_gbps",
"d2h_gbps"}`` (best raw O_DIRECT numbers; pinned host<->device copies, ``null`` without CUDA) for
``zo2tier plan --calibration``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shapes import drop_page_cache

# ---- defaults; each can be overridden with --key=value (dashes or underscores) ----------------------
DIR = "/tmp/zo2tier-bench-io"  # scratch directory on the disk under test; emptied and removed at the end
TOTAL_GIB = 8.0  # bytes moved per pass (the file size); keep it above the cgroup cap for the mmap case
BLOCK_MIB = 256  # one request / one block / one tensorstore shard
THREADS = "1,2,4,8,16"  # raw O_DIRECT thread counts
TS_CODECS = "none,zstd"  # tensorstore inner-chunk codecs after "bytes"
TS_WRITE_MODES = "default,direct"  # file_io_mode values for tensorstore writes
TS_READ_MODES = "default,direct,memmap"  # file_io_mode values for tensorstore reads
TS_SYNC = "1,0"  # file_io_sync values for tensorstore writes
TS_INNER_MIB = 4  # inner chunk of a shard (zstd frames this size)
TS_ZSTD_LEVEL = 1
TS_INFLIGHT = 4  # blocks (shards) in flight at once
TS_CONCURRENCY = 16  # file_io_concurrency and data_copy_concurrency limits
AIO_CONCURRENCY = "1,8,16"  # concurrent asyncio tasks
AIO_MODES = "buffered,direct"
MMAP_THREADS = "1,4,16"
CGROUP_CAP_GIB = 0.0  # memory.max of the cgroup the mmap phase runs in; 0 = no cgroup
MMAP_UNCAPPED = 0  # 1: run the mmap phase even without a cgroup cap (numbers then may include page cache)
BACKENDS = "raw,tensorstore,aiofiles,mmap"
CALIBRATION_OUT = ""  # path for the calibration JSON; empty = don't write
COPY_MIB = 256  # host<->device calibration copy size
KEEP = 0  # 1: keep the scratch files

GB = 1e9
CGROUP_ROOT = "/sys/fs/cgroup"

OPTS = {k.lower(): v for k, v in globals().items() if k.isupper() and not k.startswith(("GB", "CGROUP_ROOT"))}


def parse_args(argv: list[str]) -> dict:
    opts = dict(OPTS)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            sys.exit(f"bench_io.py: arguments are --key=value, got {arg!r}; keys: {sorted(opts)}")
        key, value = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in opts:
            sys.exit(f"bench_io.py: unknown option --{key}; keys: {sorted(opts)}")
        default = opts[key]
        opts[key] = type(default)(value) if not isinstance(default, str) else value
    return opts


def ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def words(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


# ---- environment ---------------------------------------------------------------------------------------


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def git_rev() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=False).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GIT_REV")  # no git checkout (the GPU machine's copy): pass GIT_REV=<sha>


def card_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu (no CUDA)"


def _disk_of(path: str) -> dict:
    """Filesystem type and the block device (model, rotational flag) holding ``path``."""
    info: dict = {}
    best = ""
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                dev, mnt, fstype = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, info = mnt, {"fs": fstype, "device": dev, "mount": mnt}
    except OSError:
        pass
    try:
        st = os.stat(path)
        sysdir = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
        for cand in (sysdir, os.path.dirname(sysdir)):  # a partition's parent holds queue/ and device/
            for key, rel in (("model", "device/model"), ("rotational", "queue/rotational")):
                p = os.path.join(cand, rel)
                if key not in info and os.path.exists(p):
                    info[key] = _read(p).strip()
    except OSError:
        pass
    return info


def host_info(directory: str) -> dict:
    import psutil

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"hostname": platform.node(), "kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "disk": _disk_of(directory),
            "python": platform.python_version()}


def files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]


def du(path: str) -> int:
    return sum(os.path.getsize(p) for p in files_under(path))


# ---- test data -----------------------------------------------------------------------------------------


def source_block(block_bytes: int):
    """One block of fp16 N(0, 0.02) values (what weights look like to zstd), as an aligned uint8 tensor."""
    import torch

    from zo2tier.store.io import aligned_empty

    buf = aligned_empty(block_bytes)
    gen = torch.Generator().manual_seed(0)
    buf[:block_bytes].view(torch.float16).copy_(torch.randn(block_bytes // 2, generator=gen) * 0.02)
    return buf


# ---- raw O_DIRECT --------------------------------------------------------------------------------------


def _run_threads(n_threads: int, work, jobs: list) -> float:
    """Run ``work(thread_index, job)`` for every job on ``n_threads`` threads; returns seconds."""
    q: queue.SimpleQueue = queue.SimpleQueue()
    for j in jobs:
        q.put(j)
    errors: list[BaseException] = []

    def loop(i: int) -> None:
        try:
            while True:
                try:
                    job = q.get_nowait()
                except queue.Empty:
                    return
                work(i, job)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(n_threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


class RawFile:
    """The raw block file and per-thread aligned buffers (allocated once, reused by every pass)."""

    def __init__(self, path: str, n_blocks: int, block_bytes: int, max_threads: int, src) -> None:
        from zo2tier.store.io import BlockFile, aligned_empty, supports_direct_io

        self.path, self.n_blocks, self.block = path, n_blocks, block_bytes
        self.direct = supports_direct_io(os.path.dirname(path))
        self.bufs = []
        for _ in range(max_threads):
            b = aligned_empty(block_bytes)
            b.copy_(src)
            self.bufs.append(b)
        self._open = lambda write: BlockFile.open(path, write=write, direct=self.direct)

    def write(self, n_threads: int, blocks: list[int] | None = None) -> float:
        blocks = list(range(self.n_blocks)) if blocks is None else blocks
        with self._open(True) as f:
            def work(i: int, b: int) -> None:
                f.write_from(self.bufs[i], self.block, offset=b * self.block)

            t0 = time.perf_counter()
            _run_threads(n_threads, work, blocks)
            f.sync()
            return time.perf_counter() - t0

    def read(self, n_threads: int, blocks: list[int] | None = None) -> float:
        blocks = list(range(self.n_blocks)) if blocks is None else blocks
        with self._open(False) as f:
            def work(i: int, b: int) -> None:
                f.read_into(self.bufs[i], self.block, offset=b * self.block)

            return _run_threads(n_threads, work, blocks)


def bench_raw(raw: RawFile, threads: list[int], note: dict) -> dict:
    total = raw.n_blocks * raw.block
    rows = []
    for t in threads:
        w = raw.write(t)
        method = drop_page_cache([raw.path])
        r = raw.read(t)
        rows.append({"threads": t, "write_gbps": round(total / w / GB, 3), "read_gbps": round(total / r / GB, 3)})
        print(f"raw O_DIRECT={raw.direct} threads={t}: write {rows[-1]['write_gbps']} GB/s, "
              f"read {rows[-1]['read_gbps']} GB/s", file=sys.stderr)
    note["cache_drop"] = method
    return {"o_direct": raw.direct, "by_threads": rows,
            "best_read_gbps": max(r["read_gbps"] for r in rows),
            "best_write_gbps": max(r["write_gbps"] for r in rows)}


def bench_raw_mixed(raw: RawFile, n_threads: int) -> dict:
    """Half the threads read the first half of the file while the other half overwrite the second half."""
    from zo2tier.store.io import BlockFile

    half = raw.n_blocks // 2
    readers, writers = max(1, n_threads // 2), max(1, n_threads - n_threads // 2)
    drop_page_cache([raw.path])
    times: dict = {}

    def reads() -> None:
        times["read"] = raw.read(readers, list(range(half)))

    def writes() -> None:
        # separate buffers from the readers': the writers use the top of the pool
        with BlockFile.open(raw.path, write=True, direct=raw.direct) as f:
            def work(i: int, b: int) -> None:
                f.write_from(raw.bufs[len(raw.bufs) - 1 - i], raw.block, offset=b * raw.block)

            t0 = time.perf_counter()
            _run_threads(writers, work, list(range(half, raw.n_blocks)))
            f.sync()
            times["write"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ths = [threading.Thread(target=reads), threading.Thread(target=writes)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    half_bytes = half * raw.block
    wr_bytes = (raw.n_blocks - half) * raw.block
    return {"readers": readers, "writers": writers,
            "read_gbps": round(half_bytes / times["read"] / GB, 3),
            "write_gbps": round(wr_bytes / times["write"] / GB, 3),
            "total_gbps": round((half_bytes + wr_bytes) / wall / GB, 3)}


# ---- tensorstore ---------------------------------------------------------------------------------------


def _ts_spec(path: str, n_blocks: int, block_elems: int, inner_elems: int, codec: str, level: int) -> dict:
    inner_codecs: list = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if codec == "zstd":
        inner_codecs.append({"name": "zstd", "configuration": {"level": level, "checksum": False}})
    elif codec != "none":
        raise ValueError(f"unknown tensorstore codec {codec!r} (none, zstd)")
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": path},
        "metadata": {
            "shape": [n_blocks, block_elems],
            "data_type": "float16",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, block_elems]}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [1, inner_elems],
                "codecs": inner_codecs,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                "index_location": "end",
            }}],
        },
    }


def _ts_context(mode: str, sync: bool, concurrency: int):
    import tensorstore as ts

    spec = {"file_io_concurrency": {"limit": concurrency}, "data_copy_concurrency": {"limit": concurrency},
            "file_io_sync": sync, "cache_pool": {"total_bytes_limit": 0}}
    if mode != "default":
        spec["file_io_mode"] = {"mode": mode}
    return ts.Context(ts.Context.Spec(spec))


def bench_tensorstore(o: dict, root: str, n_blocks: int, block_bytes: int, src, staging) -> dict:
    import numpy as np
    import tensorstore as ts

    block_elems = block_bytes // 2
    inner_elems = min(block_elems, o["ts_inner_mib"] * 2**19)
    total = n_blocks * block_bytes
    src_np = src[:block_bytes].view(__import__("torch").float16).numpy()
    stage_np = staging[:block_bytes].view(__import__("torch").float16).numpy()
    inflight = max(1, o["ts_inflight"])
    out: dict = {"shard_mib": block_bytes / 2**20, "inner_chunk_mib": inner_elems * 2 / 2**20,
                 "zstd_level": o["ts_zstd_level"], "inflight_blocks": inflight,
                 "concurrency": o["ts_concurrency"], "writes": [], "reads": []}
    for codec in words(o["ts_codecs"]):
        path = os.path.join(root, f"ts-{codec}")
        spec = _ts_spec(path, n_blocks, block_elems, inner_elems, codec, o["ts_zstd_level"])
        written = False
        for mode in words(o["ts_write_modes"]):
            for sync in ints(o["ts_sync"]):
                row = {"codec": codec, "file_io_mode": mode, "file_io_sync": bool(sync)}
                try:
                    shutil.rmtree(path, ignore_errors=True)
                    store = ts.open(spec, create=True, delete_existing=True,
                                    context=_ts_context(mode, bool(sync), o["ts_concurrency"])).result()
                    t0 = time.perf_counter()
                    pending = []
                    for b in range(n_blocks):
                        pending.append(store[b].write(src_np))
                        if len(pending) >= inflight:
                            pending.pop(0).result()
                    for f in pending:
                        f.result()
                    os.sync()  # file_io_sync=false leaves dirty pages: count their write-back too
                    dt = time.perf_counter() - t0
                    row.update(write_gbps=round(total / dt / GB, 3), stored_ratio=round(du(path) / total, 4))
                    written = True
                    del store
                except Exception as exc:  # noqa: BLE001 - an unsupported option is a result, not a crash
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                out["writes"].append(row)
                print(f"tensorstore write {row}", file=sys.stderr)
        if not written:
            continue
        for mode in words(o["ts_read_modes"]):
            row = {"codec": codec, "file_io_mode": mode}
            try:
                row["cache_drop"] = drop_page_cache(files_under(path))
                store = ts.open(spec, open=True, read=True,
                                context=_ts_context(mode, True, o["ts_concurrency"])).result()
                t0 = time.perf_counter()
                pending = []
                for b in range(n_blocks):
                    pending.append(store[b].read())
                    if len(pending) >= inflight:
                        np.copyto(stage_np, pending.pop(0).result())  # into the staging buffer, as the hot path
                for f in pending:
                    np.copyto(stage_np, f.result())
                dt = time.perf_counter() - t0
                row["read_gbps"] = round(total / dt / GB, 3)
                del store
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            out["reads"].append(row)
            print(f"tensorstore read {row}", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)
    ok_w = [r["write_gbps"] for r in out["writes"] if "write_gbps" in r]
    ok_r = [r["read_gbps"] for r in out["reads"] if "read_gbps" in r]
    out["best_write_gbps"] = max(ok_w) if ok_w else None
    out["best_read_gbps"] = max(ok_r) if ok_r else None
    return out


# ---- aiofiles ------------------------------------------------------------------------------------------


def bench_aiofiles(raw: RawFile, concurrencies: list[int], modes: list[str]) -> dict:
    import concurrent.futures

    import aiofiles

    total = raw.n_blocks * raw.block
    rows = []

    async def run(n_tasks: int, write: bool, direct: bool) -> float:
        flags = getattr(os, "O_DIRECT", 0) if direct else 0
        opener = (lambda p, fl: os.open(p, fl | flags, 0o644))
        blocks = iter(range(raw.n_blocks))
        # one executor thread per task, so the task count is the I/O concurrency
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=n_tasks)
        loop = asyncio.get_running_loop()

        async def task(i: int) -> None:
            view = memoryview(raw.bufs[i % len(raw.bufs)].numpy())[: raw.block]
            async with aiofiles.open(raw.path, "r+b" if write else "rb", buffering=0, opener=opener,
                                     executor=pool) as f:
                for b in blocks:
                    await f.seek(b * raw.block)
                    done = 0
                    while done < raw.block:
                        n = await (f.write(view[done:]) if write else f.readinto(view[done:]))
                        if not n:
                            raise OSError(f"aiofiles made no progress at block {b}")
                        done += n
                if write:
                    await loop.run_in_executor(pool, os.fsync, f.fileno())

        t0 = time.perf_counter()
        await asyncio.gather(*(task(i) for i in range(n_tasks)))
        if write:
            await loop.run_in_executor(pool, os.sync)
        dt = time.perf_counter() - t0
        pool.shutdown()
        return dt

    for mode in modes:
        direct = mode == "direct"
        if direct and not raw.direct:
            rows.append({"mode": mode, "error": "O_DIRECT not supported on this filesystem"})
            continue
        for c in concurrencies:
            w = asyncio.run(run(c, True, direct))
            method = drop_page_cache([raw.path])
            r = asyncio.run(run(c, False, direct))
            rows.append({"mode": mode, "tasks": c, "write_gbps": round(total / w / GB, 3),
                         "read_gbps": round(total / r / GB, 3), "cache_drop": method})
            print(f"aiofiles {rows[-1]}", file=sys.stderr)
    ok = [r for r in rows if "read_gbps" in r]
    return {"by_tasks": rows, "best_read_gbps": max((r["read_gbps"] for r in ok), default=None),
            "best_write_gbps": max((r["write_gbps"] for r in ok), default=None)}


# ---- cgroup v2 cap -------------------------------------------------------------------------------------


def enter_capped_cgroup(cap_gib: float) -> dict:
    """Move this process into a fresh cgroup v2 ``zo2tier-benchio-PID`` with memory.max = cap.

    Needs root and cgroup v2 mounted at /sys/fs/cgroup with the memory controller enabled for children
    (``memory`` in ``cgroup.subtree_control``). Memory already charged (buffers allocated before the move)
    stays with the old cgroup: v2 does not migrate charges, so the cap bounds what is allocated from here
    on, chiefly the page cache of the mmap phase. Returns a dict for the record; ``path`` is None when
    not permitted, with the reason in ``note``.
    """
    info: dict = {"cap_gib": cap_gib, "path": None}
    mounts = _read("/proc/mounts").split("\n")
    if not any(ln.split()[1:3] == [CGROUP_ROOT, "cgroup2"] for ln in mounts if len(ln.split()) > 2):
        info["note"] = f"{CGROUP_ROOT} is not a cgroup v2 mount (hybrid/v1 host): mmap measured without a cap"
        return info
    if os.geteuid() != 0:
        info["note"] = "not root: cannot create a cgroup, mmap measured without a cap"
        return info
    try:
        controllers = _read(os.path.join(CGROUP_ROOT, "cgroup.subtree_control")).split()
        if "memory" not in controllers:
            with open(os.path.join(CGROUP_ROOT, "cgroup.subtree_control"), "w") as fh:
                fh.write("+memory")
        path = os.path.join(CGROUP_ROOT, f"zo2tier-benchio-{os.getpid()}")
        os.mkdir(path)
        with open(os.path.join(path, "memory.max"), "w") as fh:
            fh.write(str(int(cap_gib * 2**30)))
        try:
            with open(os.path.join(path, "memory.swap.max"), "w") as fh:
                fh.write("0")
        except OSError:
            pass
        with open(os.path.join(path, "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))
    except OSError as exc:
        info["note"] = f"cgroup v2 not writable ({exc}): mmap measured without a cap"
        return info
    info["path"] = path
    return info


def leave_cgroup(info: dict) -> None:
    """Record memory.peak / memory.events, move back to the parent cgroup and remove ours."""
    path = info.get("path")
    if not path:
        return
    try:
        info["memory_peak_gib"] = round(int(_read(os.path.join(path, "memory.peak"))) / 2**30, 3)
    except (OSError, ValueError):
        pass
    try:
        events = _read(os.path.join(path, "memory.events")).split("\n")
        info["memory_events"] = {ln.split()[0]: int(ln.split()[1]) for ln in events if ln.strip()}
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(CGROUP_ROOT, "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))
        os.rmdir(path)
    except OSError as exc:
        info["cleanup_error"] = str(exc)


# ---- mmap ----------------------------------------------------------------------------------------------


def bench_mmap(raw: RawFile, threads: list[int], src) -> dict:
    import numpy as np

    total = raw.n_blocks * raw.block
    src_np = src[: raw.block].numpy()
    rows = []
    for t in threads:
        stages = [b[: raw.block].numpy() for b in raw.bufs[:t]]
        out_map = np.memmap(raw.path, dtype=np.uint8, mode="r+", shape=(total,))

        def write(i: int, b: int, out_map=out_map) -> None:
            np.copyto(out_map[b * raw.block:(b + 1) * raw.block], src_np)

        t0 = time.perf_counter()
        _run_threads(t, write, list(range(raw.n_blocks)))
        out_map.flush()  # msync
        os.sync()
        w = time.perf_counter() - t0
        del out_map, write
        method = drop_page_cache([raw.path])
        in_map = np.memmap(raw.path, dtype=np.uint8, mode="r", shape=(total,))

        def read(i: int, b: int, in_map=in_map, stages=stages) -> None:
            np.copyto(stages[i], in_map[b * raw.block:(b + 1) * raw.block])

        r = _run_threads(t, read, list(range(raw.n_blocks)))
        del in_map, read
        rows.append({"threads": t, "write_gbps": round(total / w / GB, 3), "read_gbps": round(total / r / GB, 3),
                     "cache_drop": method})
        print(f"mmap {rows[-1]}", file=sys.stderr)
    return {"by_threads": rows, "best_read_gbps": max(r["read_gbps"] for r in rows),
            "best_write_gbps": max(r["write_gbps"] for r in rows)}


# ---- host <-> device -----------------------------------------------------------------------------------


def bus_gbps(n_bytes: int) -> tuple[float | None, float | None]:
    """Pinned host->device and device->host copy GB/s (median of 10), or (None, None) without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    host = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    res = []
    for fn in (lambda: dev.copy_(host, non_blocking=True), lambda: host.copy_(dev, non_blocking=True)):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        times.sort()
        res.append(round(n_bytes / times[len(times) // 2] / GB, 2))
    return res[0], res[1]


# ---- main ----------------------------------------------------------------------------------------------


def main(argv: list[str]) -> dict:
    o = parse_args(argv)
    block = o["block_mib"] * 2**20
    n_blocks = max(2, int(o["total_gib"] * 2**30) // block)
    total = n_blocks * block
    threads = ints(o["threads"])
    backends = words(o["backends"])
    os.makedirs(o["dir"], exist_ok=True)
    record: dict = {
        "bench": "io", "card": card_name(), "host": host_info(os.path.abspath(o["dir"])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_rev": git_rev(), "command": " ".join([os.path.relpath(sys.argv[0])] + argv) if sys.argv else "",
        "dir": os.path.abspath(o["dir"]), "total_bytes": total, "block_mib": o["block_mib"], "n_blocks": n_blocks,
        "gb": "1e9 bytes",
    }
    src = source_block(block)
    raw = RawFile(os.path.join(o["dir"], "raw.bin"), n_blocks, block, max(threads + ints(o["mmap_threads"])
                                                                              + ints(o["aio_concurrency"])), src)
    try:
        # untimed fill, so every timed write overwrites allocated blocks (as the store's write-back does)
        raw.write(max(threads))
        if "raw" in backends:
            note: dict = {}
            record["raw"] = bench_raw(raw, threads, note)
            record["raw"]["cache_drop"] = note.get("cache_drop")
            record["raw_mixed"] = bench_raw_mixed(raw, max(threads))
            print(f"raw mixed {record['raw_mixed']}", file=sys.stderr)
        if "tensorstore" in backends:
            record["tensorstore"] = bench_tensorstore(o, o["dir"], n_blocks, block, src, raw.bufs[0])
        if "aiofiles" in backends:
            record["aiofiles"] = bench_aiofiles(raw, ints(o["aio_concurrency"]), words(o["aio_modes"]))
        if "mmap" in backends:
            cg = enter_capped_cgroup(o["cgroup_cap_gib"]) if o["cgroup_cap_gib"] > 0 else \
                {"cap_gib": 0, "path": None, "note": "--cgroup-cap-gib not given"}
            if cg["path"] and total <= cg["cap_gib"] * 2**30:
                cg["warning"] = "the file fits under the cap: raise --total-gib above --cgroup-cap-gib"
            if cg["path"] or o["mmap_uncapped"]:
                try:
                    record["mmap"] = bench_mmap(raw, ints(o["mmap_threads"]), src)
                finally:
                    leave_cgroup(cg)
            else:
                record["mmap"] = {"skipped": True}
            record["mmap"]["capped"] = bool(cg["path"])
            record["mmap"]["cgroup"] = cg
            print(f"mmap cgroup {cg}", file=sys.stderr)
    finally:
        if not o["keep"]:
            shutil.rmtree(o["dir"], ignore_errors=True)
    h2d, d2h = bus_gbps(o["copy_mib"] * 2**20)
    record["h2d_gbps"], record["d2h_gbps"] = h2d, d2h
    if o["calibration_out"]:
        cal = {"disk_read_gbps": record.get("raw", {}).get("best_read_gbps"),
               "disk_write_gbps": record.get("raw", {}).get("best_write_gbps"),
               "disk_mixed_read_gbps": record.get("raw_mixed", {}).get("read_gbps"),
               "disk_mixed_write_gbps": record.get("raw_mixed", {}).get("write_gbps"),
               "h2d_gbps": h2d, "d2h_gbps": d2h,
               "card": record["card"], "date": record["date"], "git_rev": record["git_rev"],
               "o_direct": raw.direct, "source": "tools/bench_io.py"}
        os.makedirs(os.path.dirname(os.path.abspath(o["calibration_out"])), exist_ok=True)
        with open(o["calibration_out"], "w") as fh:
            json.dump(cal, fh, indent=1)
        record["calibration_out"] = o["calibration_out"]
    return record


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
