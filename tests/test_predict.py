"""The planner's step-time arithmetic (docs/design.md §1 rates), checked by hand on small numbers."""

import pytest

from zo2tier.budget import TierBudget
from zo2tier.plan import BlockSize, PlanInput, plan_placement
from zo2tier.predict import Calibration, predict_step


def _inp(storage="fp16"):
    blocks = tuple(BlockSize(f"b{i}", 10**9) for i in range(4))
    return PlanInput(blocks, resident_numel=0, compute_bytes=2, storage={t: storage for t in ("device", "host", "disk")})


def test_host_tier_is_bus_bound_and_k_removes_the_download():
    inp = _inp()
    plan = plan_placement(inp, TierBudget(10**11, 10**11, 0), {f"b{i}": "host" for i in range(4)})
    cal = Calibration(h2d_gbps=50, d2h_gbps=50, bus_both_gbps=80, forward_tflops=1e6, fused_pass_gbps=1e6)
    every = predict_step(inp, plan, cal, tokens=1, write_back_every=1)
    assert every.bus_s == pytest.approx(16e9 / 80e9)  # 8 GB up + 8 GB down over the shared bus
    assert every.bound == "bus" and every.disk_s == 0
    deferred = predict_step(inp, plan, cal, tokens=1, write_back_every=16)
    assert deferred.bus_s == pytest.approx(8e9 / 50e9)  # the upload alone


def test_disk_tier_counts_reads_and_amortized_writes():
    inp = _inp("int8")
    plan = plan_placement(inp, TierBudget(10**11, 0, 10**11), {f"b{i}": "disk" for i in range(4)})
    cal = Calibration(disk_read_gbps=2.0, disk_write_gbps=4.0)
    pred = predict_step(inp, plan, cal, tokens=1, write_back_every=8)
    stored = 4 * (10**9 + 4 * (10**9 // 128) + 3)
    assert pred.disk_s == pytest.approx(stored / 2e9 + stored / 8 / 4e9)
    assert pred.bound == "disk"


def test_compute_bound_when_everything_is_on_the_device():
    inp = _inp()
    plan = plan_placement(inp, TierBudget(10**11, 0, 0))
    pred = predict_step(inp, plan, Calibration(forward_tflops=100.0, fused_pass_gbps=1000.0, rng_gnps=200.0),
                        tokens=2048)
    assert pred.bound == "compute"
    # forwards, the fused pass's bytes, and two RNG passes per weight: the step's z and last step's update
    assert pred.compute_s == pytest.approx(4 * 4e9 * 2048 / 100e12 + 4e9 * 6 / 1000e9 + 2 * 4e9 / 200e9)


def test_deferred_write_back_replays_pending_updates():
    """A host block written back every K steps replays (K + 1) / 2 pending updates per visit on average."""
    inp = _inp()
    plan = plan_placement(inp, TierBudget(10**11, 10**11, 0), {f"b{i}": "host" for i in range(4)})
    cal = Calibration(h2d_gbps=1e6, d2h_gbps=1e6, bus_both_gbps=1e6, forward_tflops=1e9, fused_pass_gbps=1e9,
                      rng_gnps=1.0, copy_block_s=0.0)
    for k in (1, 8):
        pred = predict_step(inp, plan, cal, tokens=1, write_back_every=k)
        assert pred.compute_s == pytest.approx(4 * (1 + (k + 1) / 2), rel=1e-3)


def test_int8_write_backs_cost_encode_compute():
    """Every int8 block written back is re-encoded on the GPU: 1/K of the offloaded int8 blocks per step, all
    device-tier int8 (and the int8 resident set) every step; float storage adds nothing."""
    cal = Calibration(h2d_gbps=1e6, d2h_gbps=1e6, bus_both_gbps=1e6, forward_tflops=1e9, fused_pass_gbps=1e9,
                      int8_encode_gnps=2.0, rng_gnps=1e9, copy_block_s=0.0)
    base = {"tokens": 1, "write_back_every": 4}
    fp16 = _inp()
    host = {f"b{i}": "host" for i in range(4)}
    assert predict_step(fp16, plan_placement(fp16, TierBudget(10**11, 10**11, 0), host), cal, **base).compute_s < 1e-3
    int8 = _inp("int8")  # 4 host blocks of 1e9 in int8, each written every 4 steps; no resident set
    pred = predict_step(int8, plan_placement(int8, TierBudget(10**11, 10**11, 0), host), cal, **base)
    assert pred.compute_s == pytest.approx(4e9 / 4 / 2e9, rel=1e-3) and pred.bound == "compute"
    dev = PlanInput(int8.blocks, int8.resident_numel, 2, {"device": "int8", "host": "int8", "disk": "int8"})
    on_device = predict_step(dev, plan_placement(dev, TierBudget(10**11, 0, 0)), cal, **base)
    assert on_device.compute_s == pytest.approx((4e9 + dev.resident_numel) / 2e9, rel=1e-3)


def test_a_copy_spends_at_least_the_floor_in_each_block():
    """Small blocks cost ``copy_block_s`` per copy (the CPU side of their forward); large ones their flops."""
    cal = Calibration(forward_tflops=1000.0, fused_pass_gbps=1e12, rng_gnps=1e12, copy_block_s=1e-3)
    small = PlanInput(tuple(BlockSize(f"b{i}", 10**6) for i in range(4)), resident_numel=10**6, compute_bytes=4,
                      storage={t: "fp32" for t in ("device", "host", "disk")})
    on_device = plan_placement(small, TierBudget(10**11, 0, 0))
    pred = predict_step(small, on_device, cal, tokens=1000, estimator="fzoo", n_perturbations=4)
    assert pred.compute_s == pytest.approx(5 * 5 * 1e-3, rel=1e-3)  # 5 copies x (4 blocks + the resident set)
    big = _inp()  # 4 blocks of 1e9 weights: 2 * 1e9 * 1000 / 1000e12 = 2 ms per copy each, above the floor
    pred = predict_step(big, plan_placement(big, TierBudget(10**11, 0, 0)), cal, tokens=1000)
    assert pred.compute_s == pytest.approx(2 * 4 * 2e-3, rel=1e-3)


def test_bad_calibration_file_is_refused(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        Calibration.load(str(path))


def test_zstd_on_disk_scales_disk_bytes_by_the_ratio_and_adds_codec_time():
    inp = _inp("bf16")
    plan = plan_placement(inp, TierBudget(10**11, 0, 10**11), {f"b{i}": "disk" for i in range(4)})
    cal = Calibration(disk_read_gbps=2.0, disk_write_gbps=4.0, zstd_ratio_bf16=0.5,
                      zstd_decompress_gbps=8.0, zstd_compress_gbps=2.0)
    plain = predict_step(inp, plan, cal, tokens=1, write_back_every=8)
    pred = predict_step(inp, plan, cal, tokens=1, write_back_every=8, compress=True)
    stored = 4 * 2 * 10**9
    assert pred.disk_s == pytest.approx(0.5 * plain.disk_s)
    assert pred.zstd_s == pytest.approx(stored / 8e9 + stored / 8 / 2e9) and plain.zstd_s == 0
    assert pred.bound == "disk" and pred.step_s == pytest.approx(2.125)  # 1.5 s of zstd under 4.25 s / 2 of disk
    assert pred.step_s < plain.step_s  # here zstd pays
    slow = predict_step(inp, plan, Calibration(), tokens=1, compress=True)  # default rates: zstd bound
    assert slow.bound == "zstd"


@pytest.mark.parametrize("fused", [True, False])
def test_device_working_bytes_count_what_the_engine_allocates(fused):
    """Scratch ±, the fp32 resident copy, upload slots for host blocks, one disk block in flight; the fp32
    replay buffer and the encoded buffer only off the fused path; on it, int8 storage adds the encoded
    buffer and one write-back range."""
    from zo2tier.plan import WRITE_BACK_RANGE_BYTES, working_bytes
    from zo2tier.visit.runner import WRITE_BACK_RANGE_NUMEL

    assert WRITE_BACK_RANGE_BYTES == WRITE_BACK_RANGE_NUMEL * 32  # the planner counts the range the engine uses

    n, r = 1000, 600  # block and resident numel
    inp = PlanInput(tuple(BlockSize(f"b{i}", n) for i in range(5)), resident_numel=r, compute_bytes=2,
                    storage={"device": "fp16", "host": "fp16", "disk": "fp16"}, lookahead_blocks=2, fused=fused)
    # θ±εz scratch: both halves of a block (fused) or one, at least the resident set; the fp32 resident copy
    # and the fp32 block off the fused path only
    base = 2 * n * 2 if fused else n * 2 + 4 * r + 4 * n + 2 * n
    assert working_bytes(inp, 0) == base
    assert working_bytes(inp, 5) == base + 3 * 2 * n  # three slots
    assert working_bytes(inp, 2) == base + 2 * 2 * n  # never more slots than host blocks
    assert working_bytes(inp, 0, 3) == base + 2 * n  # the one disk block being computed
    int8 = PlanInput(inp.blocks, r, 2, {"device": "fp16", "host": "fp16", "disk": "int8"}, 2, fused=fused)
    int8_block = n + 4 * ((n + 127) // 128)  # the codec's layout: payload (padded to 4 bytes) and the scales
    # fused: the encoded int8 block and one write-back range (WRITE_BACK_RANGE_BYTES), never an fp32 block;
    # generic: an fp32 block and the widest encoded block
    extra = WRITE_BACK_RANGE_BYTES + int8_block if fused else 4 * n + 2 * n
    assert working_bytes(int8, 0, 1) == (2 * n * 2 if fused else n * 2 + 4 * r) + extra + int8_block
    if fused:  # an int8 tier that holds no block never makes the range buffers (they are made at a write-back)
        assert working_bytes(int8, 0, 0) == 2 * n * 2
    # layers bound part by part: the scratch holds the largest part (or the largest resident module)
    parts = PlanInput(inp.blocks, r, 2, inp.storage, 2, fused=fused, largest_part=250, largest_resident_module=550)
    assert working_bytes(parts, 0) == (550 * 2 if fused else 550 * 2 + 4 * r + 4 * n + 2 * n)


@pytest.mark.parametrize("k", [1, 16])
def test_plan_from_config_counts_the_upload_slots_the_engine_opens(tmp_path, k):
    """`zo2tier plan` and the engine agree on the host upload lookahead for a given write-back interval
    (2 slots, whatever the interval), so the CLI's device figure is the engine's."""
    import transformers as tf
    from tiny_models import tiny_model

    import zo2tier
    from zo2tier.planning import plan_from_config

    cfg = tf.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    cfg.to_json_file(str(tmp_path / "config.json"))
    _, inp = plan_from_config(str(tmp_path / "config.json"), TierBudget.parse("device=1GiB,host=1GiB"))
    place = {b: "host" for b in zo2tier.ZOEngine.block_names(tiny_model("opt"))}
    with zo2tier.ZOEngine(tiny_model("opt"), budget={"device": "1GiB", "host": "1GiB"}, placement=place,
                          write_back_every=k) as engine:
        assert inp.lookahead_blocks == engine.plan_input.lookahead_blocks == 1


def test_unplanned_device_bytes_count_context_logits_loss_and_a_part():
    """What the GPU holds besides the planned buffers: the CUDA context, the doubled batch's logits (3 B
    each), the loss chunk (LOSS_CHUNK_ROWS rows in fp32, twice) and the largest part's activations."""
    from zo2tier.plan import CUDA_CONTEXT_BYTES, LOSS_CHUNK_BYTES_PER_VOCAB, unplanned_device_bytes
    from zo2tier.zo.update import LOSS_CHUNK_ROWS

    assert LOSS_CHUNK_BYTES_PER_VOCAB == 2 * LOSS_CHUNK_ROWS * 4
    inp = PlanInput((BlockSize("b0", 1000),), 10, 2, largest_part=400, vocab_size=100)
    assert unplanned_device_bytes(inp, tokens=8) == CUDA_CONTEXT_BYTES + 3 * 2 * 8 * 100 + 2 * 256 * 4 * 100 + 400


# ---- several perturbations per step and q = "auto" (docs/estimators.md) ------------------------------------
def _host_plan(inp):
    return plan_placement(inp, TierBudget(10**11, 10**11, 0), {f"b{i}": "host" for i in range(4)})


# bus 16 GB / 80 GB/s = 0.2 s per step; a forward of one copy 2 * 4e9 * 1000 / 2000e12 = 4 ms; one z or one
# replayed entry over the 4e9 weights 10 ms; the fused pass's bytes negligible
AUTO_CAL = Calibration(h2d_gbps=50, d2h_gbps=50, bus_both_gbps=80, forward_tflops=2000.0, fused_pass_gbps=1e9,
                       rng_gnps=400.0, copy_block_s=0.0)


def test_q_multiplies_copies_z_draws_and_replays_not_bytes():
    inp = _inp()
    plan = _host_plan(inp)
    one = predict_step(inp, plan, AUTO_CAL, tokens=1000)
    assert one == predict_step(inp, plan, AUTO_CAL, tokens=1000, estimator="mezo", n_perturbations=1)
    # mezo q: 2q copies (8 ms per q), q z + q replayed entries per weight (K = 1: 20 ms per q)
    three = predict_step(inp, plan, AUTO_CAL, tokens=1000, n_perturbations=3)
    assert three.compute_s == pytest.approx(3 * 0.028, rel=1e-6)
    assert (three.bus_s, three.disk_s) == (one.bus_s, one.disk_s)
    # fzoo q: q + 1 copies
    fz = predict_step(inp, plan, AUTO_CAL, tokens=1000, estimator="fzoo", n_perturbations=3)
    assert fz.compute_s == pytest.approx(3 * 0.02 + 4 * 0.004, rel=1e-6)


def test_auto_q_is_the_largest_that_hides_under_the_transfer():
    from zo2tier.predict import choose_perturbations

    inp = _inp()
    plan = _host_plan(inp)
    mezo = choose_perturbations(inp, plan, AUTO_CAL, batch=1, seq=1000, estimator="mezo")
    assert (mezo.n_perturbations, mezo.limit) == (7, "transfer")  # 0.028 q <= 0.2
    fzoo = choose_perturbations(inp, plan, AUTO_CAL, batch=1, seq=1000, estimator="fzoo")
    assert (fzoo.n_perturbations, fzoo.limit) == (8, "transfer")  # 0.024 q + 0.004 <= 0.2
    assert fzoo.prediction.step_s == pytest.approx(0.2) and fzoo.prediction.bound == "bus"
    capped = choose_perturbations(inp, plan, AUTO_CAL, batch=1, seq=1000, estimator="fzoo", max_perturbations=5)
    assert (capped.n_perturbations, capped.limit) == (5, "max")


def test_auto_q_on_a_compute_bound_plan_is_the_estimators_steady_q():
    from zo2tier.predict import choose_perturbations

    inp = _inp()
    plan = plan_placement(inp, TierBudget(10**11, 0, 0))  # all on the device: nothing to hide under
    for name, q in (("mezo", 1), ("fzoo", 8), ("fzoo-ema", 1)):
        choice = choose_perturbations(inp, plan, AUTO_CAL, batch=1, seq=1000, estimator=name)
        assert (choice.n_perturbations, choice.limit) == (q, "compute"), name


def test_auto_q_never_goes_below_fzoos_steady_q_for_a_faster_step():
    """A bus that hides only 4 of FZOO's perturbations: auto still takes 8 (fewer trained worse, so the
    longer step is the better buy) and says the step is then compute-bound; MeZO takes the 2 that hide."""
    from dataclasses import replace

    from zo2tier.predict import choose_perturbations

    inp = _inp()
    plan = _host_plan(inp)
    slow = replace(AUTO_CAL, rng_gnps=1200.0, forward_tflops=250.0)  # a z or replay 3.3 ms, a copy 32 ms
    mezo = choose_perturbations(inp, plan, slow, batch=1, seq=1000, estimator="mezo")
    fzoo = choose_perturbations(inp, plan, slow, batch=1, seq=1000, estimator="fzoo")
    assert (fzoo.n_perturbations, fzoo.limit) == (8, "compute")
    assert fzoo.prediction.compute_s > max(fzoo.prediction.bus_s, fzoo.prediction.disk_s)
    assert (mezo.n_perturbations, mezo.limit) == (2, "transfer")  # 4 copies: 0.141 s; 6: 0.212 s > 0.2 s


def test_activation_bytes_by_hand():
    from zo2tier.predict import activation_bytes

    # hidden 64 = resident 64000 / vocab 1000; intermediate 256 = part 32768 / (2 * 64)
    inp = PlanInput((BlockSize("b0", 10**6),), resident_numel=64_000, compute_bytes=2, largest_part=32_768,
                    vocab_size=1000)
    # more than two copies also hold their stacked weights: 3 copies of the 32,768-weight part in fp16
    assert activation_bytes(inp, batch=2, seq=10, n_copies=3) == 60 * (3 * 1000 + 2 * (3 * 64 + 256)) + 3 * 65_536
    assert activation_bytes(inp, batch=2, seq=10, n_copies=2) == 40 * (3 * 1000 + 2 * (3 * 64 + 256))
    with pytest.raises(ValueError, match="n_copies=0 must be >= 1"):
        activation_bytes(inp, batch=2, seq=10, n_copies=0)


def test_auto_q_is_capped_by_the_device_memory_left():
    from zo2tier.plan import unplanned_device_bytes
    from zo2tier.predict import activation_bytes, choose_perturbations

    blocks = tuple(BlockSize(f"b{i}", 10**9) for i in range(4))
    inp = PlanInput(blocks, resident_numel=50_000 * 1000, compute_bytes=2,
                    storage={t: "fp16" for t in ("device", "host", "disk")}, vocab_size=50_000)
    base = plan_placement(inp, TierBudget(10**11, 10**11, 0), {f"b{i}": "host" for i in range(4)})
    per_copy = activation_bytes(inp, 1, 1000, 1)  # 1000 tokens x (3 x 50000 + 2 x (3 x 1000 + 1e9 // 2000))
    assert per_copy == 1000 * (150_000 + 2 * (3000 + 500_000))
    fixed = base.used_bytes["device"] + unplanned_device_bytes(inp, 0)
    budget = TierBudget(fixed + 5 * per_copy + per_copy // 2, 10**11, 0)  # room for 5 copies
    plan = plan_placement(inp, budget, {f"b{i}": "host" for i in range(4)})
    mezo = choose_perturbations(inp, plan, AUTO_CAL, batch=1, seq=1000, estimator="mezo")
    assert (mezo.n_perturbations, mezo.limit) == (2, "memory")  # 4 copies fit, 6 do not
    fzoo = choose_perturbations(inp, plan, AUTO_CAL, batch=1, seq=1000, estimator="fzoo")
    assert (fzoo.n_perturbations, fzoo.limit) == (4, "memory")  # q + 1 = 5 copies fit
    assert fzoo.activation_bytes == 5 * per_copy <= fzoo.device_bytes_left


def test_more_than_two_copies_of_small_blocks_cost_one_stacked_call_and_a_little_per_copy():
    """Small blocks are bound by the CPU side of their forwards: two copies cost two copy floors; more run
    stacked (zo2tier.plan.STACK_BYTES), one call per block plus a little per copy."""
    cal = Calibration(copy_block_s=1e-3, stack_call_s=3e-3, stack_copy_s=4e-4, rng_gnps=1e9, fused_pass_gbps=1e9)
    inp = PlanInput(tuple(BlockSize(f"b{i}", 1000) for i in range(4)), resident_numel=0, compute_bytes=4)
    plan = plan_placement(inp, TierBudget(10**9, 0, 0))
    mezo = predict_step(inp, plan, cal, tokens=10)
    fzoo = predict_step(inp, plan, cal, tokens=10, estimator="fzoo", n_perturbations=16)
    assert mezo.compute_s == pytest.approx(4 * 2 * 1e-3, rel=1e-3)
    assert fzoo.compute_s == pytest.approx(4 * (3e-3 + 17 * 4e-4), rel=1e-3)
