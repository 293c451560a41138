"""What a fine-tune shows while it runs (a progress bar) and after (a PNG of the curves)."""

from __future__ import annotations

import json
import sys
from typing import Any


class Meter:
    """A tqdm bar with loss, tok/s, step time and per-tier GB/s; ``update`` returns the step's log record.

    Host GB/s counts the host-tier blocks' stored bytes fetched per forward; disk GB/s comes from the tier
    manager's read/write counters.
    """

    def __init__(self, engine: Any, *, total: int, initial: int = 0, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self._engine = engine
        self._host_bytes = sum(r.stored_bytes for r in engine.table.by_tier("host"))
        self._read = engine.tiers.bytes_read
        self._written = engine.tiers.bytes_written
        self._bar = tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr,
                         dynamic_ncols=True, desc="mezo")

    def update(self, step: int, result: Any, lr: float, n_tokens: int, step_s: float) -> dict[str, Any]:
        """The ``train`` record of the job's step ``step`` (1-based; ``result.step`` is the log's index, which
        a step of q perturbations advances by q)."""
        tiers = self._engine.tiers
        read, written = tiers.bytes_read - self._read, tiers.bytes_written - self._written
        self._read, self._written = tiers.bytes_read, tiers.bytes_written
        loss = 0.5 * (result.loss_plus + result.loss_minus)
        rec = {"event": "train", "step": step, "loss": loss, "loss_plus": result.loss_plus,
               "loss_minus": result.loss_minus, "projected_grad": result.projected_grad, "lr": lr,
               "skipped": result.skipped, "tokens": n_tokens, "step_s": step_s, "tok_s": n_tokens / step_s,
               "host_GBps": self._host_bytes / step_s / 1e9, "disk_read_GBps": read / step_s / 1e9,
               "disk_write_GBps": written / step_s / 1e9}
        self._bar.set_postfix_str(
            f"loss {loss:.4f} | {rec['tok_s']:.0f} tok/s | {step_s:.2f} s/step | host {rec['host_GBps']:.2f} GB/s"
            f" | disk r {rec['disk_read_GBps']:.2f} w {rec['disk_write_GBps']:.2f} GB/s", refresh=False)
        self._bar.update(1)
        return rec

    def note(self, text: str) -> None:
        self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


def plot_curves(log_path: str, png_path: str) -> str | None:
    """Train loss (raw and smoothed) and eval accuracy against step, from ``log.jsonl``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curves.png (pip install matplotlib)", file=sys.stderr)
        return None
    train, evals = [], {}
    with open(log_path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("event") == "train":
                train.append((rec["step"], rec["loss"]))
            elif rec.get("event") == "eval":
                evals.setdefault(rec["split"], []).append((rec["step"], rec["acc"]))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps, losses = zip(*train)
        ax_loss.plot(steps, losses, lw=0.6, alpha=0.4, label="train loss")
        k = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
                  for i in range(len(losses))]
        ax_loss.plot(steps, smooth, lw=1.5, label=f"mean of last {k}")
    ax_loss.set(xlabel="step", ylabel="loss", title="train loss (mean of the ±ε halves)")
    ax_loss.legend()
    for split, points in sorted(evals.items()):
        steps, accs = zip(*sorted(points))
        ax_acc.plot(steps, accs, marker="o", label=f"{split} accuracy")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="label-word accuracy")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
