"""Draw a zo2tier Chrome trace (``ZOEngine.trace`` / ``bench_step.py --trace``) as lanes in a PNG.

    python tools/plot_trace.py --trace=runs/step.json --png=benchmarks/trace.png

One row per lane (compute, H2D copy, D2H copy, each disk reader / writer thread); each span is a bar.
Overlap shows as bars of different rows at the same time. The title gives each lane's busy fraction of
the traced interval. One JSON line on stdout: the interval and each lane's busy seconds.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _options import parse_overrides

TRACE = "runs/step.json"
PNG = "runs/step.png"
COLORS = {"compute": "tab:green", "H2D copy": "tab:blue", "D2H copy": "tab:purple", "disk read": "tab:orange",
          "disk write": "tab:red"}


def _busy_s(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of (start_us, dur_us) spans."""
    total, end = 0.0, float("-inf")
    for start, dur in sorted(spans):
        stop = start + dur
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e6


def main() -> None:
    cfg = parse_overrides({"trace": TRACE, "png": PNG}, sys.argv[1:])
    with open(cfg["trace"]) as f:
        events = json.load(f)["traceEvents"]
    lanes = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X"]
    if not spans:
        raise SystemExit(f"{cfg['trace']} holds no spans")
    t0 = min(e["ts"] for e in spans)
    t1 = max(e["ts"] + e["dur"] for e in spans)
    order = sorted(lanes)
    busy = {lanes[t]: _busy_s([(e["ts"], e["dur"]) for e in spans if e["tid"] == t]) for t in order}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 0.5 * len(order) + 1.5))
    for row, tid in enumerate(order):
        lane = lanes[tid]
        color = next((c for k, c in COLORS.items() if lane.startswith(k)), "tab:gray")
        bars = [((e["ts"] - t0) / 1e3, e["dur"] / 1e3) for e in spans if e["tid"] == tid]
        ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=color, edgecolors="black", linewidth=0.3)
    ax.set_yticks(range(len(order)), [lanes[t].replace(" zo2tier-", " #") for t in order])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first span")
    span_s = (t1 - t0) / 1e6
    ax.set_title(f"{os.path.basename(cfg['trace'])}: {span_s * 1e3:.0f} ms; busy: "
                 + ", ".join(f"{k.split(' zo2tier')[0]} {v / span_s:.0%}" for k, v in busy.items()
                             if not k.startswith(("disk read zo2tier-read_1", "disk write zo2tier-write_1"))),
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(cfg["png"], dpi=110)
    print(json.dumps({"trace": cfg["trace"], "png": cfg["png"], "interval_s": span_s, "busy_s": busy}))


if __name__ == "__main__":
    main()
