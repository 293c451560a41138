"""A per-block timeline of the tier pipeline, written as a Chrome trace (open in Perfetto or chrome://tracing).

Lanes: ``compute`` (each block's dual forward, its fused perturbation and write-back encode included),
``H2D copy`` and ``D2H copy`` (the CUDA copy streams), and one lane per reader / writer thread
(``disk read zo2tier-read_0``, ...). CPU-side spans are wall-clock (``time.perf_counter_ns``); GPU spans
are CUDA events resolved against a reference event recorded when the timeline starts, so both share one
clock. Example::

    with engine.trace("runs/step.json"):
        engine.step(batch)

``tools/plot_trace.py`` draws the lanes as a PNG.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _GpuSpan:
    lane: str
    name: str
    start: torch.cuda.Event
    end: torch.cuda.Event | None = None


class Timeline:
    """Spans recorded from any thread; :meth:`export` writes them as Chrome trace events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cpu: list[tuple[str, str, int, int]] = []  # (lane, name, start_ns, end_ns)
        self._gpu: list[_GpuSpan] = []
        self._lock = threading.Lock()
        self._ref: torch.cuda.Event | None = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record(torch.cuda.current_stream(device))
            torch.cuda.synchronize(device)
        self._t0_ns = time.perf_counter_ns()  # the GPU reference event completed just before this

    @contextlib.contextmanager
    def cpu_span(self, lane: str, name: str) -> Iterator[None]:
        """Time the ``with`` body on the calling thread's wall clock."""
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            end = time.perf_counter_ns()
            with self._lock:
                self._cpu.append((lane, name, start, end))

    def thread_lane(self, prefix: str) -> str:
        """A lane per worker thread: ``"{prefix} {thread name}"``."""
        return f"{prefix} {threading.current_thread().name}"

    @contextlib.contextmanager
    def stream_span(self, lane: str, name: str, stream: torch.cuda.Stream) -> Iterator[None]:
        """Time the GPU work the ``with`` body enqueues on ``stream`` (CUDA events, resolved at export)."""
        span = _GpuSpan(lane, name, torch.cuda.Event(enable_timing=True))
        span.start.record(stream)
        with self._lock:
            self._gpu.append(span)
        try:
            yield
        finally:
            span.end = torch.cuda.Event(enable_timing=True)
            span.end.record(stream)

    def span(self, lane: str, name: str):
        """The device's own notion of a span: CUDA events on the current stream, else wall clock."""
        if self._ref is None:
            return self.cpu_span(lane, name)
        return self.stream_span(lane, name, torch.cuda.current_stream(self.device))

    def events(self) -> list[dict]:
        """Chrome trace events (``ph: X``, microseconds since the timeline started), lanes named."""
        if self._ref is not None:
            torch.cuda.synchronize(self.device)
        rows = [(lane, name, (s - self._t0_ns) / 1e3, (e - s) / 1e3) for lane, name, s, e in self._cpu]
        for g in self._gpu:
            if g.end is None:
                continue
            start_us = self._ref.elapsed_time(g.start) * 1e3
            rows.append((g.lane, g.name, start_us, self._ref.elapsed_time(g.end) * 1e3 - start_us))
        lanes = sorted({r[0] for r in rows}, key=_lane_order)
        tid = {lane: i + 1 for i, lane in enumerate(lanes)}
        meta = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": tid[lane], "args": {"name": lane}} for lane in lanes]
        meta += [{"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": tid[lane], "args": {"sort_index": tid[lane]}}
                 for lane in lanes]
        spans = [{"ph": "X", "name": name, "cat": lane.split(" zo2tier")[0], "pid": 1, "tid": tid[lane], "ts": round(ts, 3),
                  "dur": round(max(dur, 0.0), 3)} for lane, name, ts, dur in sorted(rows, key=lambda r: r[2])]
        return meta + spans

    def export(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump({"traceEvents": self.events(), "displayTimeUnit": "ms"}, f)
        return path


def _lane_order(lane: str) -> tuple[int, str]:
    for i, prefix in enumerate(("compute", "H2D", "D2H", "disk read", "disk write")):
        if lane.startswith(prefix):
            return i, lane
    return 9, lane


@contextlib.contextmanager
def record_trace(engine: Any, path: str | os.PathLike) -> Iterator[Timeline]:
    """``ZOEngine.trace``: the engine's runner (compute lane) and tiers (copy, reader and writer lanes) record
    into one timeline until the ``with`` ends; then the write-backs in flight land in it and it is written."""
    if engine.runner.timeline is not None:
        raise RuntimeError("a trace is already being recorded; traces do not nest")
    timeline = Timeline(engine.device)
    engine.runner.set_timeline(timeline)
    engine.tiers.set_timeline(timeline)
    try:
        yield timeline
        engine.tiers.drain()  # the write-backs started inside the trace land in it
    finally:
        engine.runner.set_timeline(None)
        engine.tiers.set_timeline(None)
    timeline.export(os.fspath(path))
