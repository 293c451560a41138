"""The rates a benchmark record measured in its own run, under zo2tier.predict.Calibration's keys."""

from __future__ import annotations

# int8 write-backs re-encoded by the torch codec (records without "int8_encoder", before git 32befc6's
# measurements made the Triton encoder the default): an OPT-13B layer (315M) took ~170 ms of compute on the
# H100 (benchmarks/trace_opt13b_int8_host_h100.json).
TORCH_INT8_ENCODE_GNPS = 1.85
# z through libdevice's log/sin/cos (records without "z_math", before git 68fb501 made the fast functions the
# default): the replay rate fitted to OPT-13B int8 host steps at git 32befc6.
LIBDEVICE_RNG_GNPS = 323.0


def measured_rates(record: dict) -> dict:
    """Calibration keyword arguments for what ``record`` (a tools/bench_step.py JSON line) measured: the raw
    O_DIRECT disk read and write rates when it had disk blocks, the bus rates on CUDA. Missing: not included,
    so Calibration keeps its default."""
    rates = {}
    if record.get("raw_disk_read_gbps") and record.get("raw_disk_write_gbps"):
        rates.update(disk_read_gbps=record["raw_disk_read_gbps"], disk_write_gbps=record["raw_disk_write_gbps"])
    if record.get("bus_h2d_gbps"):
        rates.update(h2d_gbps=record["bus_h2d_gbps"], d2h_gbps=record["bus_d2h_gbps"],
                     bus_both_gbps=record["bus_duplex_gbps"])
    if "int8" in (record.get("storage") or {}).values() and record.get("int8_encoder", "torch") == "torch":
        rates.update(int8_encode_gnps=TORCH_INT8_ENCODE_GNPS)  # records before the Triton encoder
    if record.get("z_math", "libdevice") == "libdevice":
        rates.update(rng_gnps=LIBDEVICE_RNG_GNPS)  # records before the fast special functions
    return rates
