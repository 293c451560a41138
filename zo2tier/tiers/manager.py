"""Moves stored block bytes between the three tiers: device memory, (pinned) host RAM and disk files.

Bytes only, no math: the engine decodes what this returns and hands back what it encoded. Disk blocks are
read by a pool of reader threads into aligned staging buffers, ahead of use, in schedule order; write-backs
go through their own writer threads and copy-on-write files (write ``.tmp``, fsync, rename), so a crash
never destroys the only good copy. With ``compress`` (zo2tier.store.zstd), disk blocks are stored as zstd
frames: the store's frame threads decompress them straight into the staging buffers and compress the
write-backs.
"""

from __future__ import annotations

import contextlib
import os
import queue
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from zo2tier.store.io import BlockFile, BlockIOError, PinnedPool, align_up, aligned_empty
from zo2tier.store.zstd import Zstd
from zo2tier.tiers.cuda_path import CudaTransfers
from zo2tier.tiers.records import BlockRecord, BlockTable
from zo2tier.trace import Timeline


class TierManager:
    """Holds the stored bytes of every block and streams disk blocks ahead of the schedule.

    Construction allocates nothing; :meth:`open` allocates the pools and starts the threads.
    With ``store`` set (a zo2tier.store.blockstore.BlockStore), disk blocks are that store's files:
    written copy-on-write as new generations and checked (xxh3) when read.
    """

    store = None  # set by the engine before open()

    def __init__(
        self,
        table: BlockTable,
        *,
        device: torch.device,
        disk_dir: str | None,
        lookahead_blocks: int = 2,
        upload_slots: int | None = None,
        n_readers: int = 4,
        n_writers: int = 2,
        direct_io: bool = True,
        compress: Zstd | None = None,
    ) -> None:
        self.table = table
        self.device = device
        self.disk_dir = disk_dir
        self.lookahead_blocks = max(0, lookahead_blocks)  # disk reads in flight ahead of the block computing
        # device slots for host-tier uploads (CUDA); None: lookahead_blocks + 1. Never more than the host blocks.
        self.upload_slots = self.lookahead_blocks + 1 if upload_slots is None else max(1, upload_slots)
        self._n_readers, self._n_writers = n_readers, n_writers
        self._direct = direct_io
        self.compress = compress  # disk blocks are written as zstd frames (needs a store)
        self._pin = device.type == "cuda"
        self._readers: ThreadPoolExecutor | None = None
        self._writers: ThreadPoolExecutor | None = None
        self._read_pool: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self._write_pool: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self._inflight: deque[tuple[int, Future]] = deque()
        self._next_request = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self._cuda: CudaTransfers | None = None
        self.timeline: Timeline | None = None  # set by ZOEngine.trace(); spans of the reader/writer threads
        self._host_next = 0

    # ---- life cycle -------------------------------------------------------------------------------
    def open(self) -> TierManager:
        disk = self.table.by_tier("disk")
        if disk and self.compress is not None and self.store is None:
            raise ValueError("compress needs the disk tier to be a store (zo2tier.store.blockstore.BlockStore); "
                             "build the engine with disk_dir, or pass compress=None")
        largest = max((align_up(r.stored_bytes) for r in disk), default=0)
        n_staging = (self.lookahead_blocks + 1 + self._n_writers + 1) if disk else 0
        host_bytes = sum(align_up(r.stored_bytes) for r in self.table.by_tier("host"))
        # pinned chunks are powers of two (torch rounds pinned requests up to one): up to 8 GiB, so that
        # the tail a chunk cannot use stays a small fraction of it
        want = max(n_staging * largest, min(host_bytes, 2**33), 1)
        # on CUDA, chunks are locked in place at their exact size (cudaHostRegister): the host tier takes no
        # more RAM than its blocks (docs/io.md, "Pinned host memory")
        self._pinned = PinnedPool(pin=self._pin, chunk_bytes=1 << (want - 1).bit_length(),
                                  total_bytes=n_staging * largest + host_bytes, exact=self._pin)
        if disk:
            for _ in range(self.lookahead_blocks + 1):
                self._read_pool.put(self._pinned.take(largest))
            for _ in range(self._n_writers + 1):
                self._write_pool.put(self._pinned.take(largest))
            self._readers = ThreadPoolExecutor(self._n_readers, thread_name_prefix="zo2tier-read")
            self._writers = ThreadPoolExecutor(self._n_writers, thread_name_prefix="zo2tier-write")
        host = self.table.by_tier("host")
        if host and self.device.type == "cuda":
            largest_host = max(r.stored_bytes for r in host)
            self._cuda = CudaTransfers(self.device, largest_host, min(self.upload_slots, len(host))).open()
        return self

    def set_timeline(self, timeline: Timeline | None) -> None:
        """Record the reader/writer threads' and the copy streams' spans into ``timeline`` (None: stop)."""
        self.timeline = timeline
        if self._cuda is not None:
            self._cuda.timeline = timeline

    @property
    def h2d_bytes(self) -> int:
        return self._cuda.h2d_bytes if self._cuda is not None else 0

    @property
    def d2h_bytes(self) -> int:
        return self._cuda.d2h_bytes if self._cuda is not None else 0

    def close(self) -> None:
        """Wait for every write-back, then stop the threads."""
        self.drain()
        for pool in (self._readers, self._writers):
            if pool is not None:
                pool.shutdown(wait=True)
        self._readers = self._writers = None  # drain() above synchronized the copy streams
        if getattr(self, "_pinned", None) is not None:
            self._pinned.close()

    def drain(self) -> None:
        """Wait until all reads in flight and all write-backs have finished; raise the first write error.

        A failed read is dropped here: the block's next :meth:`fetch` reads it again (and raises if it fails).
        """
        while self._inflight:
            _, fut = self._inflight.popleft()
            self._recycle(fut)
        self._next_request = 0
        if self._cuda is not None:
            self._cuda.synchronize()
        error = self._settle_writes()
        if error is not None:
            raise error

    # ---- placement at start-up --------------------------------------------------------------------
    def put_initial(self, record: BlockRecord, raw: torch.Tensor) -> None:
        """Store a block's first copy (``raw``: its encoded uint8 bytes) in its tier."""
        if record.tier == "device":
            record.data = raw.to(self.device, copy=True)
        elif record.tier == "host":
            buf = self._pinned.take(record.stored_bytes)[: record.stored_bytes]
            buf.copy_(raw)
            record.data = buf
        else:
            record.path = os.path.join(self.disk_dir, f"block_{record.index:05d}.bin")
            staging = aligned_empty(record.stored_bytes)
            staging[: record.stored_bytes].copy_(raw)
            self._write_file(record, staging, release=False)

    # ---- reads ------------------------------------------------------------------------------------
    def fetch(self, record: BlockRecord) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored bytes of ``record`` (on device or host), and the staging buffer to :meth:`release`."""
        if record.tier == "host" and self._cuda is not None:
            slot = self._cuda.take(record)
            return slot, slot
        if record.tier != "disk":
            return record.data, None
        while self._inflight and self._inflight[0][0] != record.index:
            _, stale = self._inflight.popleft()  # the schedule was broken (e.g. an exception): drop it
            self._recycle(stale)
        if self._inflight:
            _, fut = self._inflight.popleft()
            staging = fut.result()  # a failed read has already given its buffer back
            try:
                self._settle_write(record)  # the read waited for it; raise its error, if any, now
            except BaseException:
                self._read_pool.put(staging)
                raise
        else:
            self._settle_write(record)
            staging = self._read_pool.get()
            try:
                self._read_file(record, staging)
            except BaseException:
                self._read_pool.put(staging)
                raise
            self._next_request = (record.index + 1) % len(self.table)
        return staging[: record.stored_bytes], staging

    def wait_for(self, record: BlockRecord) -> None:
        """Block until the read in flight for ``record`` has landed, so a timeline's compute span of the block
        starts once its bytes are at hand: a stall on the disk shows as a gap in the compute lane."""
        fut = next((f for j, f in self._inflight if j == record.index), None)
        if fut is not None:
            wait([fut])  # a failed read raises in fetch, where the step handles it

    def _recycle(self, fut: Future) -> None:
        try:
            self._read_pool.put(fut.result())
        except Exception:  # noqa: BLE001, S110 - _read_task gave the buffer back; the block's next fetch retries the read
            pass

    def release(self, staging: torch.Tensor | None, after: torch.cuda.Event | None = None) -> None:
        """Hand back what :meth:`fetch` lent, once the caller has enqueued its last use (and, for an upload
        slot, once ``after`` has completed: the :meth:`write_back` event of a copy down from the slot)."""
        if staging is None:
            return
        if staging.device.type == "cuda":
            self._cuda.give_back(staging, after)
        else:
            self._read_pool.put(staging)

    def prefetch_after(self, index: int) -> None:
        """Keep reads of the next disk blocks after ``index`` (wrapping past the last) in flight."""
        if self._cuda is not None:
            self._prefetch_host(index)
        if self._readers is None:
            return
        n = len(self.table)
        if not self._inflight:
            self._next_request = (index + 1) % n
        scanned = 0
        while len(self._inflight) < self.lookahead_blocks and scanned < n:
            j = self._next_request
            self._next_request = (j + 1) % n
            scanned += 1
            record = self.table[j]
            if record.tier != "disk" or j == index:
                continue
            if any(k == j for k, _ in self._inflight):
                # j's read for its next visit is still queued: a second read now would start before that
                # visit writes j back and would return stale bytes. Resume from j once it is consumed.
                self._next_request = j
                break
            staging = self._read_pool.get()
            self._inflight.append((j, self._readers.submit(self._read_task, record, staging)))

    def _prefetch_host(self, index: int) -> None:
        n = len(self.table)
        if not self._cuda.queued():
            self._host_next = (index + 1) % n
        scanned = 0
        while self._cuda.has_free_slot() and scanned < n:
            j = self._host_next
            if j == index and scanned:
                break
            self._host_next = (j + 1) % n
            scanned += 1
            if self.table[j].tier == "host" and j != index and not self._cuda.is_queued(j):
                self._cuda.upload(self.table[j])

    def _read_task(self, record: BlockRecord, staging: torch.Tensor) -> torch.Tensor:
        pending = record.write_future
        if pending is not None:  # read the new file; if the write failed the old one is intact and is read
            wait([pending])
        try:
            with self._span("disk read", record.name):
                self._read_file(record, staging)
        except BaseException:
            self._read_pool.put(staging)  # never lose a staging buffer, or the next fetch would wait forever
            raise
        return staging

    def _read_file(self, record: BlockRecord, staging: torch.Tensor) -> None:
        if self.store is not None:
            self.store.read_into(record.index, staging, direct=self._direct)
            self.bytes_read += record.stored_bytes
            return
        try:
            f = BlockFile.open(record.path, write=False, direct=self._direct)
        except FileNotFoundError as exc:
            raise BlockIOError(exc.errno, f"block {record.name}: its file {record.path} is missing; restore the "
                               "store from a checkpoint (or rebuild it from the model)") from exc
        with f:
            f.read_into(staging, record.stored_bytes, what=f"block {record.name}")
        self.bytes_read += record.stored_bytes

    # ---- writes -----------------------------------------------------------------------------------
    @property
    def sends_ranges(self) -> bool:
        """Host blocks can go down range by range (:meth:`send_range`): the CUDA host tier."""
        return self._cuda is not None

    def send_range(self, record: BlockRecord, raw: torch.Tensor, lo: int, hi: int) -> torch.cuda.Event:
        """Start copying bytes ``[lo, hi)`` of a host block's new copy ``raw`` down now, before the rest of it
        is written (a layer part by part). The host copy is in flux until :meth:`sent` stores the block."""
        return self._cuda.write_back(record, raw, lo, hi)

    def sent(self, record: BlockRecord, n_steps: int) -> None:
        """Every range of a host block's new copy has been sent: it now holds ``n_steps`` updates."""
        self.table.mark_applied(record, n_steps)

    def write_back(self, record: BlockRecord, raw: torch.Tensor, *, n_steps: int) -> torch.cuda.Event | None:
        """Store ``raw`` (encoded uint8 bytes, any device) as the block's new copy in its tier.

        A host block on CUDA is copied down asynchronously: the returned event marks the copy having landed,
        and ``raw`` must not change before it (every other tier copies ``raw`` before returning None).

        ``n_steps`` is the number of logged updates ``raw`` holds. The record's ``applied_steps`` moves to it
        only once the copy is stored: for the disk tier, when the write is seen to succeed (at the block's
        next fetch or write-back, or at :meth:`drain`). A failed write raises there and leaves
        ``applied_steps`` alone, so the updates stay pending in the log and nothing is lost.
        """
        if record.tier == "device":
            if raw.data_ptr() != record.data.data_ptr():
                record.data.copy_(raw)
            self.table.mark_applied(record, n_steps)
            return None
        if record.tier == "host":
            landed = None
            if self._cuda is not None:
                landed = self._cuda.write_back(record, raw)
            else:
                record.data.copy_(raw)
            self.table.mark_applied(record, n_steps)
            return landed
        self._settle_write(record)
        staging = self._write_pool.get()
        staging[: record.stored_bytes].copy_(raw)
        record.write_future = self._writers.submit(self._write_file, record, staging, True, n_steps)
        return None

    def _settle_write(self, record: BlockRecord) -> None:
        """Wait for the block's write-back and mark its steps applied; raise its error if it failed."""
        fut, record.write_future = record.write_future, None
        if fut is None:
            return
        try:
            n_steps = fut.result()
        except BaseException:
            self._settle_writes()  # collect the other failures too, so one retry after freeing space works
            raise
        self.table.mark_applied(record, n_steps)

    def _settle_writes(self) -> BaseException | None:
        """Wait for every write-back, mark the successful ones applied; return the first error."""
        first = None
        for r in self.table:
            fut, r.write_future = r.write_future, None
            if fut is None:
                continue
            try:
                self.table.mark_applied(r, fut.result())
            except Exception as exc:  # noqa: BLE001 - every write-back is waited for; the first error is returned
                first = first or exc
        return first

    def _span(self, prefix: str, name: str):
        tl = self.timeline
        return tl.cpu_span(tl.thread_lane(prefix), name) if tl is not None else contextlib.nullcontext()

    def _write_file(self, record: BlockRecord, staging: torch.Tensor, release: bool = True, n_steps: int = 0) -> int:
        with self._span("disk write", record.name):
            return self._write_file_now(record, staging, release, n_steps)

    def _write_file_now(self, record: BlockRecord, staging: torch.Tensor, release: bool, n_steps: int) -> int:
        if self.store is not None:  # a new generation file; the store keeps the committed one
            try:
                entry = self.store.write_block(record.index, staging, dtype=record.storage, direct=self._direct,
                                               compress=self.compress)
                record.path = self.store.file_path(entry)
                self.bytes_written += record.stored_bytes
            finally:
                if release:
                    self._write_pool.put(staging)
            return n_steps
        tmp = record.path + ".tmp"
        what = f"block {record.name} of the disk store {self.disk_dir}"
        try:
            with BlockFile.open(tmp, write=True, direct=self._direct) as f:
                f.write_from(staging, record.stored_bytes, what=what)
                if not f.direct:
                    f.truncate(record.stored_bytes)
                f.sync(what=what, n_bytes=record.stored_bytes)
            os.replace(tmp, record.path)
            self.bytes_written += record.stored_bytes
        except BaseException:
            _remove_quietly(tmp)  # the old file is the good copy; a partial .tmp would only hold space
            raise
        finally:
            if release:
                self._write_pool.put(staging)
        return n_steps


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
