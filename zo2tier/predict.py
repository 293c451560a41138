"""Predicted step time from measured rates: pure arithmetic over a placement, no tensors and no I/O.

A step visits every block once. Per step it moves, for each block:

- host tier: its stored bytes up the bus, and back down every ``write_back_every`` steps;
- disk tier: its stored bytes read from disk and up the bus, and written back every ``write_back_every`` steps;

and computes two forwards (the doubled batch) plus one fused pass over its weights that draws the step's z
and replays the block's pending updates (one RNG pass each: ``rng_gnps``; a host or disk block has
(K + 1) / 2 pending on average, a device block one), and re-encodes every int8 block it writes back
(``int8_encode_gnps``). With zstd on the disk
tier (``compress=True``) the disk moves ``ratio`` times the bytes, and the CPU decompresses every disk
block read and compresses every one written. Compute, bus, disk and zstd run on their own streams and
threads, so the step takes as long as the slowest of them; that one is the bound (docs/io.md, "zstd on the
disk tier": a block costs max(ratio * B / disk, B / zstd)).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from zo2tier.plan import LOGIT_BYTES, Plan, PlanInput, block_bytes, stack_copies, unplanned_device_bytes
from zo2tier.zo.estimators import ESTIMATORS, Estimator

# q = "auto" never goes past this: the estimate's variance falls like 1/q, but each perturbation is one more
# z drawn per weight on every replay and one more log entry, and FZOO's paper uses 8
AUTO_MAX_PERTURBATIONS = 16


@dataclass(frozen=True)
class Calibration:
    """Measured rates of one machine (GB/s are 10**9 bytes per second).

    Defaults are the H100 machine's figures from docs/design.md §1; ``tools/bench_io.py --calibration-out``
    writes the first four for your own machine.
    """

    disk_read_gbps: float = 2.24
    disk_write_gbps: float = 2.84
    h2d_gbps: float = 55.3
    d2h_gbps: float = 52.9
    bus_both_gbps: float = 96.0  # both directions at once, in total
    forward_tflops: float = 650.0  # effective fp16 TFLOP/s of a decoder-layer forward at long sequences
    # the least time one copy of the batch spends in one block, however small: the CPU side of its forward
    # (launching its kernels, the proxy's views). Fitted on the H200 (benchmarks/time_to_accuracy.jsonl,
    # time_device, git 2c27a5a): SmolLM2-135M fp32, every block on the GPU, 0.088 s a step at 2 copies and
    # 0.802 s at 17: 47.6 ms per copy over 31 blocks. Large blocks are bound by forward_tflops instead
    # (an OPT-13B layer at 2,048 tokens: 2.0 ms).
    copy_block_s: float = 1.5e-3
    # the same floor where a step of more than two copies runs a block's copies stacked (one vmapped call
    # per block part, CUDA): stack_call_s per call plus stack_copy_s per copy. Fitted on the H100
    # (benchmarks/time_to_accuracy.jsonl, time_device, git 4bc8b20): SmolLM2-135M fp32, 0.297 s a step at 17
    # copies and 0.49 s at 33 (one copy at a time: 1.105 s at 17).
    stack_call_s: float = 3.0e-3
    stack_copy_s: float = 4.0e-4
    fused_pass_gbps: float = 2500.0  # device-memory rate of the fused perturbation kernel
    # elements per second (1e9) of one Philox z pass inside the fused kernel (the step's z, or one replayed
    # update), and that an int8 write-back re-encodes (the Triton encoder, zo.fused.encode_int8). rng_gnps:
    # fitted to OPT-13B host steps with fast z (fp16 K = 16, int8 K = 8 and 16; H100, git 68fb501,
    # benchmarks/step_h100.jsonl), within 10% of each; it was 323 with libdevice's functions.
    # int8_encode_gnps: fitted at K = 1, 4 and 8 (git 32befc6, docs/io.md "Update log and write-back").
    rng_gnps: float = 420.0
    int8_encode_gnps: float = 53.0
    # zstd on the disk tier: GB/s of uncompressed bytes, measured on the GPU machine's 16 cores
    # (benchmarks/zstd_h100.json, bf16, 16 threads: decompress 6.7; compress best 1.9 at 4 threads).
    # `tools/bench_zstd.py --calibration_out=PATH` writes your machine's.
    zstd_decompress_gbps: float = 6.70
    zstd_compress_gbps: float = 1.93
    zstd_ratio_fp32: float = 0.923
    zstd_ratio_bf16: float = 0.780
    zstd_ratio_fp16: float = 0.918
    zstd_ratio_int8: float = 0.937

    @classmethod
    def load(cls, path: str | None) -> Calibration:
        """Read a calibration JSON (unknown keys ignored, missing keys default); ``None`` gives defaults."""
        if path is None:
            return cls()
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"calibration file {path!r} is not a JSON object; write it with tools/bench_io.py")
        known = {f.name for f in fields(cls)}
        values = {k: float(v) for k, v in data.items() if k in known and isinstance(v, (int, float)) and v}
        return cls(**values)


@dataclass(frozen=True)
class Prediction:
    """Seconds per step for each resource, the step (their maximum) and the resource that bounds it."""

    compute_s: float
    bus_s: float
    disk_s: float
    zstd_s: float = 0.0  # CPU time to decompress and compress disk blocks (0 without compression)

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.bus_s, self.disk_s, self.zstd_s)

    @property
    def bound(self) -> str:
        return max((self.compute_s, "compute"), (self.bus_s, "bus"), (self.disk_s, "disk"), (self.zstd_s, "zstd"))[1]


def predict_step(
    inp: PlanInput, plan: Plan, cal: Calibration, *, tokens: int, write_back_every: int = 1, compress: bool = False,
    replays: float | None = None, estimator: str = "mezo", n_perturbations: int = 1,
) -> Prediction:
    """Predict one training step of ``tokens`` tokens (batch × sequence) under ``plan``; ``compress``: the
    disk tier stores zstd frames (ratio ``cal.zstd_ratio_<disk dtype>``); ``replays``: pending steps a host
    or disk block replays per visit (default ``(write_back_every + 1) / 2``, the steady state; 0 for passes
    with no updates, such as evaluation).

    ``estimator`` and ``n_perturbations`` (q, docs/estimators.md): the step runs the estimator's copies of the
    batch (2q two-sided, q + 1 one-sided), builds one θ+εz scratch write per perturbed copy, draws q z per
    weight and logs q entries, so each pending step replays q RNG passes. The bytes moved do not depend on q.
    """
    if tokens <= 0 or write_back_every < 1:
        raise ValueError(f"tokens={tokens} and write_back_every={write_back_every} must be positive")
    cls = _estimator_class(estimator)
    q = n_perturbations
    copies, perturbed = cls.n_copies(q), 2 * q if not cls.one_sided else q
    up = down = read = write = encoded = 0.0
    rng = q * (sum(b.numel for b in inp.blocks) + inp.resident_numel)  # the step's q z, drawn once per weight
    pending = q * ((write_back_every + 1) / 2 if replays is None else replays)  # q entries per pending step
    if inp.storage["device"] == "int8":  # device-tier int8 (the resident set too) is re-encoded every step
        encoded += inp.resident_numel
    for b in inp.blocks:
        tier = plan.placement[b.name]
        if inp.storage[tier] == "int8":
            encoded += b.numel / (1 if tier == "device" else write_back_every)
        rng += b.numel * (q if tier == "device" else pending)  # pending updates replayed
        if tier == "device":
            continue
        stored = block_bytes(b.numel, inp.storage[tier])
        up += stored
        down += stored / write_back_every if tier == "host" else 0.0
        if tier == "disk":
            read += stored
            write += stored / write_back_every
    # a forward per copy of the batch: 2 flops per weight per token in each block, or the block's floor
    sizes = [b.numel for b in inp.blocks] + ([inp.resident_numel] if inp.resident_numel else [])
    floor = copies * cal.copy_block_s  # what one block's copies cost however small it is
    per_call = stack_copies(_part_bytes(inp))
    if copies > 2 and per_call > 1:  # stacked, as many at once as the stack holds
        floor = -(-copies // per_call) * cal.stack_call_s + copies * cal.stack_copy_s
    forward = sum(max(copies * 2 * n * tokens / (cal.forward_tflops * 1e12), floor) for n in sizes)
    fused = sum(b.numel for b in inp.blocks) * (1 + perturbed) * inp.compute_bytes  # read θ, write each θ+εz
    compute = (forward + fused / (cal.fused_pass_gbps * 1e9)
               + rng / (cal.rng_gnps * 1e9) + encoded / (cal.int8_encode_gnps * 1e9))
    bus = max(up / (cal.h2d_gbps * 1e9), down / (cal.d2h_gbps * 1e9), (up + down) / (cal.bus_both_gbps * 1e9))
    ratio = getattr(cal, f"zstd_ratio_{inp.storage['disk']}") if compress else 1.0
    disk = ratio * (read / (cal.disk_read_gbps * 1e9) + write / (cal.disk_write_gbps * 1e9))
    codec = read / (cal.zstd_decompress_gbps * 1e9) + write / (cal.zstd_compress_gbps * 1e9) if compress else 0.0
    return Prediction(compute, bus, disk, codec)


@dataclass(frozen=True)
class PerturbationChoice:
    """What ``n_perturbations="auto"`` picks: q, the predicted step at that q, and what stopped q growing.

    ``limit``: "transfer" (one more would no longer hide under the bus/disk time), "memory" (the copies'
    activations and logits would not fit the device budget left after the plan), "max"
    (:data:`AUTO_MAX_PERTURBATIONS`) or "compute" (the step is compute-bound even at the estimator's
    steady q, ``Estimator.default_perturbations``, so nothing more hides: that q).
    """

    n_perturbations: int
    prediction: Prediction
    limit: str
    activation_bytes: int
    device_bytes_left: int


def activation_bytes(inp: PlanInput, batch: int, seq: int, n_copies: int) -> int:
    """Device bytes the ``n_copies`` stacked copies of a (batch, seq) batch take in one forward, beyond the
    planned buffers: their full-vocabulary logits (``LOGIT_BYTES`` per logit, as measured for the doubled
    batch on the H100) and one layer part's activations per copy: the residual stream, the part's input and
    output and its widest intermediate, in the compute dtype. The hidden width is estimated from the resident
    set (embeddings: vocab × hidden, so an untied head counts twice: an overestimate), the intermediate width
    from the largest part (an MLP of 2-3 hidden × intermediate matrices)."""
    if batch < 1 or seq < 1 or n_copies < 1:
        raise ValueError(f"batch={batch}, seq={seq} and n_copies={n_copies} must be >= 1")
    tokens = n_copies * batch * seq
    hidden = inp.resident_numel // inp.vocab_size if inp.vocab_size else 0
    part = inp.largest_part or max((b.numel for b in inp.blocks), default=0)
    inner = part // (2 * hidden) if hidden else 0
    return tokens * (LOGIT_BYTES * inp.vocab_size + inp.compute_bytes * (3 * hidden + inner)) + stack_bytes(
        inp, n_copies)


def stack_bytes(inp: PlanInput, n_copies: int) -> int:
    """GPU bytes of the stacked weights a step of ``n_copies`` copies runs a block part on: more than two
    copies run stacked, as many at once as :data:`zo2tier.plan.STACK_BYTES` holds (docs/estimators.md)."""
    stacked = min(n_copies, stack_copies(_part_bytes(inp)))
    return stacked * _part_bytes(inp) if n_copies > 2 and stacked > 1 else 0


def _part_bytes(inp: PlanInput) -> int:
    """Bytes of the largest block part in the compute dtype (the largest block where parts are not known)."""
    return max(inp.largest_part or max((b.numel for b in inp.blocks), default=0), 1) * inp.compute_bytes


def choose_perturbations(
    inp: PlanInput, plan: Plan, cal: Calibration, *, batch: int, seq: int, estimator: str = "mezo",
    write_back_every: int = 1, compress: bool = False, max_perturbations: int = AUTO_MAX_PERTURBATIONS,
) -> PerturbationChoice:
    """The largest q whose extra compute still hides under the plan's transfer time, capped so that the
    copies' activations and logits (:func:`activation_bytes`) fit the device budget left after the plan and
    the fixed extras (CUDA context, loss chunk: :func:`zo2tier.plan.unplanned_device_bytes` without logits).
    Never below the estimator's steady q (``default_perturbations``: FZOO 8) unless memory forces it; a plan
    whose transfers hide less than that is then stopped by ``"compute"``.

    "Hides": the predicted compute at q is at most the slowest transfer (bus, disk or zstd), so the step
    time does not grow. A compute-bound plan (every block on the device) hides nothing: q is the
    estimator's steady q. Example::

        choice = choose_perturbations(inp, plan, Calibration(), batch=16, seq=64, estimator="fzoo")
        MeZOConfig(estimator="fzoo", n_perturbations=choice.n_perturbations)
    """
    cls = _estimator_class(estimator)
    low = cls.min_perturbations
    if max_perturbations < low:
        raise ValueError(f"max_perturbations={max_perturbations} is below {estimator!r}'s minimum {low}; raise it")
    tokens = batch * seq
    left = plan.budget.device_bytes - plan.used_bytes["device"] - unplanned_device_bytes(inp, 0)

    def predict(q: int) -> Prediction:
        return predict_step(inp, plan, cal, tokens=tokens, write_back_every=write_back_every, compress=compress,
                            estimator=estimator, n_perturbations=q)

    def fits(q: int) -> bool:
        return activation_bytes(inp, batch, seq, cls.n_copies(q)) <= left

    # the estimator's steady q is the floor: fewer train worse (Estimator.default_perturbations); only memory
    # takes auto below it
    lo = min(max(cls.default_perturbations, low), max_perturbations)
    if lo > low and not fits(lo):
        while lo > low and not fits(lo):
            lo -= 1
        return _choice(lo, predict(lo), "memory", inp, batch, seq, cls, left)
    best, limit = lo, "max"
    for q in range(lo, max_perturbations + 1):
        pred = predict(q)
        transfer = max(pred.bus_s, pred.disk_s, pred.zstd_s)
        if pred.compute_s > transfer and q > lo:
            limit = "transfer"
            break
        if not fits(q) and q > lo:
            limit = "memory"
            break
        best = q
        if pred.compute_s > transfer:  # q == lo and already compute-bound
            limit = "compute"
            break
    return _choice(best, predict(best), limit, inp, batch, seq, cls, left)


def _choice(q: int, pred: Prediction, limit: str, inp: PlanInput, batch: int, seq: int, cls: type[Estimator],
            left: int) -> PerturbationChoice:
    return PerturbationChoice(q, pred, limit, activation_bytes(inp, batch, seq, cls.n_copies(q)), left)


def _estimator_class(name: str) -> type[Estimator]:
    if name not in ESTIMATORS:
        raise ValueError(f"estimator={name!r} is unknown; use one of {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name]
