"""Placement from budgets: pure arithmetic, no tensors and no I/O.

Every step visits blocks 0..L-1 in the same order, so the best static placement fills the device first,
then pinned host RAM, then disk (docs/design.md §3.4). Which blocks go where does not change the bytes moved,
so the device takes the first blocks, the host the next, the disk the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zo2tier.budget import TIERS, TierBudget, format_size
from zo2tier.tiers.codec import WRITE_BACK_RANGE_NUMEL, encoded_bytes
from zo2tier.zo.update import LOSS_CHUNK_ROWS

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
WORKING_BYTES_PER_NUMEL = 4  # an fp32 working copy
# Host uploads ahead of the block computing when the caller does not choose: 1 (two slots), whatever the
# write-back interval. A block written back goes down part by part as its kernel passes write it, so its slot
# is free about when the next block has come up. Measured on the H100 (OPT-13B fp16, every block in host RAM,
# written back every step; benchmarks/step_h100.jsonl, git f75d9d6): 0.556 s per step with two slots against
# 0.552 s with three, 0.59 GiB less GPU memory.
DEFAULT_HOST_LOOKAHEAD = 1
# a fused int8 write-back's range: fp32 buffer plus the encoder's temporaries
WRITE_BACK_RANGE_BYTES = WRITE_BACK_RANGE_NUMEL * 32
# GPU bytes besides the planner's (see unplanned_device_bytes), from the H100 runs of git f75d9d6
# (benchmarks/step_h100.jsonl, docs/scaling.md "Where the seed's projections are wrong")
CUDA_CONTEXT_BYTES = int(1.3 * 2**30)  # NVML peak minus the allocator's reserved peak: context, libraries
# on CUDA a step of more than two copies runs a block part's copies stacked, as many at once as fit this many
# bytes of stacked weights (docs/estimators.md, "Stacked copies"); MeZO's pair, an evaluation and a device type
# not listed (the CPU, where the copies' compute, not their launches, is the cost) run one copy at a time.
# 256 MiB: 25 copies of a SmolLM2-135M MLP (fp32), 3 of an OPT-1.3B one (fp16), none of OPT-13B's (420 MB),
# whose forward is bound by its flops, not its launches, so stacking would only cost memory
STACK_BYTES = {"cuda": 256 << 20}
LOGIT_BYTES = 3  # per logit of the doubled batch: the joined fp16 logits and one half being produced
LOSS_CHUNK_BYTES_PER_VOCAB = 2 * LOSS_CHUNK_ROWS * 4  # the loss's rows in fp32 and their log-softmax
PART_ACTIVATION_BYTES = 1  # per parameter of the largest layer part (fitted at OPT-13B)


@dataclass(frozen=True)
class BlockSize:
    """A movable block: its name and parameter count."""

    name: str
    numel: int


@dataclass(frozen=True)
class PlanInput:
    """Everything the planner needs; built from a config alone, without weights."""

    blocks: tuple[BlockSize, ...]
    resident_numel: int
    compute_bytes: int  # bytes per element of the compute dtype
    storage: dict[str, str] = field(default_factory=lambda: {t: "fp32" for t in TIERS})
    lookahead_blocks: int = 2  # host upload slots beyond the one being computed
    fused: bool = True  # the fused CUDA kernel serves float storage (False: CPU, or no Triton)
    # the engine's θ±εz scratch holds one part of a layer (its attention, MLP, a norm), or one resident
    # module: their largest sizes in parameters (0: unknown, counted as the largest block / resident set)
    largest_part: int = 0
    largest_resident_module: int = 0
    vocab_size: int = 0  # for the logits in unplanned_device_bytes (0: unknown, not counted)
    context_bytes: int = CUDA_CONTEXT_BYTES  # the compute device's fixed cost: a CUDA context, none on the CPU


@dataclass(frozen=True)
class Plan:
    """The placement and the bytes it costs per tier."""

    placement: dict[str, str]
    used_bytes: dict[str, int]
    budget: TierBudget
    working_bytes: int

    def counts(self) -> dict[str, int]:
        """Blocks per tier."""
        return {t: sum(1 for v in self.placement.values() if v == t) for t in TIERS}

    def table(self) -> str:
        """The plan as ``zo2tier plan`` prints it."""
        counts = self.counts()
        lines = [f"{'tier':<8}{'blocks':>8}{'used':>14}{'budget':>14}{'left':>14}"]
        for tier in TIERS:
            used, cap = self.used_bytes[tier], self.budget.of(tier)
            lines.append(
                f"{tier:<8}{counts[tier]:>8}{format_size(used):>14}{format_size(cap):>14}"
                f"{format_size(cap - used):>14}"
            )
        lines.append(f"device working buffers (included above): {format_size(self.working_bytes)}")
        return "\n".join(lines)

def stack_copies(part_bytes: int, device_type: str = "cuda") -> int:
    """Copies of a block part of ``part_bytes`` that run stacked in one call on ``device_type``: as many as
    :data:`STACK_BYTES` holds there (1: none, one copy at a time)."""
    return max(1, STACK_BYTES.get(device_type, 0) // max(1, part_bytes))


def block_bytes(numel: int, dtype: str) -> int:
    """Stored bytes of ``numel`` elements in ``dtype``, as the codec lays them out (int8: payload, padding to 4
    bytes, one fp32 scale per group)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"storage dtype {dtype!r} is unknown; use one of {', '.join(DTYPE_BYTES)}")
    return encoded_bytes(numel, dtype)


def working_bytes(inp: PlanInput, n_host: int, n_disk: int = 0) -> int:
    """Device bytes the engine allocates besides the stored blocks, as it allocates them:

    - θ±εz scratch: on the fused path both halves of the largest layer part, elsewhere one; at least the
      largest resident module (its views are built one half at a time);
    - off the fused path, or with an int8 resident set: the clean fp32 copy of the resident set, rebuilt in
      place each step (the fused path updates the stored copy in place and builds views from it);
    - off the fused CUDA path: an fp32 replay buffer of the largest block and one encoded write-back buffer;
      on it, with int8 storage: the encoded buffer and one write-back range (fp32 and encoder temporaries);
    - host blocks: ``lookahead_blocks + 1`` upload slots (never more than the host blocks), written back in
      place; disk blocks: the one block being computed, copied up from pinned staging.

    Activations, logits and the CUDA context are not counted here: :func:`unplanned_device_bytes` estimates
    them."""
    largest_block = max((b.numel for b in inp.blocks), default=0)
    largest = max(largest_block, inp.resident_numel)
    part = inp.largest_part or largest_block
    resident_module = inp.largest_resident_module or inp.resident_numel
    total = max((2 if inp.fused else 1) * part, resident_module) * inp.compute_bytes
    if not inp.fused or inp.storage["device"] == "int8":
        total += inp.resident_numel * WORKING_BYTES_PER_NUMEL
    if not inp.fused:  # the generic path decodes every block into fp32 and encodes write-backs from it
        total += largest * WORKING_BYTES_PER_NUMEL + max(block_bytes(largest, d) for d in inp.storage.values())
    elif (inp.storage["device"] == "int8" or n_host and inp.storage["host"] == "int8"
          or n_disk and inp.storage["disk"] == "int8"):  # fused float storage writes in place; int8 range by
        # range, into buffers made at the first int8 write-back (a tier that holds no block never makes them)
        total += WRITE_BACK_RANGE_BYTES + block_bytes(largest, "int8")
    if n_host:
        total += min(1 + inp.lookahead_blocks, n_host) * block_bytes(largest_block, inp.storage["host"])
    if n_disk:
        total += block_bytes(largest_block, inp.storage["disk"])
    return total


def unplanned_device_bytes(inp: PlanInput, tokens: int) -> int:
    """Device bytes a step of ``tokens`` tokens (batch × sequence) takes besides the planned ones: the CUDA
    context and libraries (``inp.context_bytes``, 0 on the CPU), the full-vocabulary logits of the doubled
    batch, the loss chunk and a layer part's activations. An estimate from measurements on the H100 (OPT-13B, every block in host RAM:
    planned 2.15 GiB + this 2.07 GiB = 4.22 GiB against 4.23 GiB NVML measured)."""
    part = inp.largest_part or max((b.numel for b in inp.blocks), default=0)
    return (inp.context_bytes + LOGIT_BYTES * 2 * tokens * inp.vocab_size
            + LOSS_CHUNK_BYTES_PER_VOCAB * inp.vocab_size + PART_ACTIVATION_BYTES * part)


def plan_placement(
    inp: PlanInput, budget: TierBudget, override: dict[str, str] | None = None
) -> Plan:
    """Place every block, device first; raise ValueError saying what falls short and what to raise."""
    names = [b.name for b in inp.blocks]
    if override is not None:
        placement = _check_override(override, names)
    else:
        placement = _fill(inp, budget)
    used = _usage(inp, placement)
    work = working_bytes(inp, *_offloaded(placement))
    for tier in TIERS:
        if used[tier] > budget.of(tier):
            short = used[tier] - budget.of(tier)
            # the floor of any split is actionable where this placement's need is not (room on the host adds
            # upload buffers on the device, so raising the host budget raises the need)
            floor = split_floor(inp)
            hint = (f" (at least {format_size(floor)} = {floor} bytes holds the resident set and the buffers of any "
                    "split of the layers over host and disk)"
                    if tier == "device" and override is None and floor > used[tier] else "")
            raise ValueError(
                f"the {tier} tier needs {format_size(used[tier])} but its budget is "
                f"{format_size(budget.of(tier))}: {format_size(short)} short; raise the {tier} budget"
                + (" or move blocks to a lower tier" if override is not None else "") + hint
            )
    return Plan(placement, used, budget, work)


def split_floor(inp: PlanInput) -> int:
    """Device bytes before any block is on the device, once the layers are split over host and disk: the
    resident set and the working buffers of both lower tiers (an upper bound for any split)."""
    n = len(inp.blocks)
    return block_bytes(inp.resident_numel, inp.storage["device"]) + working_bytes(inp, n, n)


def _usage(inp: PlanInput, placement: dict[str, str]) -> dict[str, int]:
    used = {t: 0 for t in TIERS}
    resident = block_bytes(inp.resident_numel, inp.storage["device"])
    used["device"] = resident + working_bytes(inp, *_offloaded(placement))
    for b in inp.blocks:
        tier = placement[b.name]
        used[tier] += block_bytes(b.numel, inp.storage[tier])
    return used


def _offloaded(placement: dict[str, str]) -> tuple[int, int]:
    """(host blocks, disk blocks)."""
    tiers = list(placement.values())
    return tiers.count("host"), tiers.count("disk")


def _fill(inp: PlanInput, budget: TierBudget) -> dict[str, str]:
    dev = inp.storage["device"]
    resident = block_bytes(inp.resident_numel, dev)
    all_on_device = resident + working_bytes(inp, 0) + sum(block_bytes(b.numel, dev) for b in inp.blocks)
    if all_on_device <= budget.device_bytes:  # needs no working slots
        return {b.name: "device" for b in inp.blocks}
    device_used = split_floor(inp)  # before the split: the buffers of both lower tiers
    host_left = budget.host_bytes
    placement: dict[str, str] = {}
    tier = "device"
    for b in inp.blocks:  # fill in order: a tier is closed once one block overflows it
        if tier == "device":
            if device_used + block_bytes(b.numel, dev) <= budget.device_bytes:
                device_used += block_bytes(b.numel, dev)
                placement[b.name] = "device"
                continue
            tier = "host"
        if tier == "host":
            if block_bytes(b.numel, inp.storage["host"]) <= host_left:
                host_left -= block_bytes(b.numel, inp.storage["host"])
                placement[b.name] = "host"
                continue
            tier = "disk"
        placement[b.name] = "disk"
    return placement


def _check_override(override: dict[str, str], names: list[str]) -> dict[str, str]:
    unknown = [k for k in override if k not in names]
    if unknown:
        known = f"{names[0]} ... {names[-1]}" if names else "none (the model has no movable blocks)"
        raise ValueError(f"placement names unknown block(s) {unknown}; blocks are {known}")
    bad = {k: v for k, v in override.items() if v not in TIERS}
    if bad:
        raise ValueError(f"placement {bad} uses an unknown tier; use one of {', '.join(TIERS)}")
    missing = [n for n in names if n not in override]
    if missing:
        raise ValueError(f"placement leaves {len(missing)} block(s) unplaced, e.g. {missing[0]}; place every block")
    return {n: override[n] for n in names}
