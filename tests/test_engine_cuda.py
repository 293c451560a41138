"""On a GPU, offloading is still invisible: host/disk blocks through the copy streams equal all-on-device."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_engine import BIG, spread
from tiny_models import tiny_batch, tiny_model

import zo2tier

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(arch, tmp_path, placement):
    model = tiny_model(arch)
    cfg = zo2tier.MeZOConfig(lr=1e-3, eps=1e-3, weight_decay=0.01, seed=3)
    place = placement(zo2tier.ZOEngine.block_names(model)) if placement else None
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, device="cuda", config=cfg, placement=place) as e:
        results = [e.step(tiny_batch()) for _ in range(5)]
        return results, e.evaluate(tiny_batch()), e.state_dict()


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_cuda_tiers_match_all_on_device(arch, tmp_path):
    ref = _run(arch, tmp_path / "a", None)
    got = _run(arch, tmp_path / "b", spread)
    assert [(r.loss_plus, r.loss_minus) for r in ref[0]] == [(r.loss_plus, r.loss_minus) for r in got[0]]
    assert ref[1] == got[1]
    for key in ref[2]:
        assert torch.equal(ref[2][key], got[2][key]), key


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("numel", [1, 7, 4096 + 3])
def test_fused_kernel_z_matches_cpu_spec(kind, numel):
    from zo2tier.zo import fused
    from zo2tier.zo.rng import normal

    zeros = torch.zeros(numel, device="cuda")
    plus = torch.empty(numel, device="cuda")
    minus = torch.empty(numel, device="cuda")
    fused.arrive(zeros, param_id=7, decay=False, log=fused.PendingLog.build([], torch.device("cuda")),
                 new_seed=12345, eps=1.0, plus=plus, minus=minus, write_to=None, sr_seed=0, sr_key=0,
                 sr_offset=0, kind=kind)
    ref = normal(12345, 7, numel, kind=kind)
    torch.testing.assert_close(plus.cpu(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(minus.cpu(), -ref, rtol=1e-5, atol=1e-5)


def test_fused_kernel_z_stays_within_float_rounding_over_many_values():
    """Over 4M values (the tails of u included), the fast special functions stay within a few float32 ulps of
    the CPU spec's z (|z| < 6)."""
    from zo2tier.zo import fused
    from zo2tier.zo.rng import normal

    n = 1 << 22
    zeros, got = torch.zeros(n, device="cuda"), torch.empty(n, device="cuda")
    fused.arrive(zeros, param_id=5, decay=False, log=fused.PendingLog.build([], torch.device("cuda")),
                 new_seed=4242, eps=1.0, plus=got, minus=None, write_to=None, sr_seed=0, sr_key=0, sr_offset=0)
    assert float((got.cpu() - normal(4242, 5, n)).abs().max()) < 5e-6


def test_fused_kernel_with_eps_zero_gives_the_replayed_weights():
    """eps = 0 (evaluation, int8 write-backs, flushes) draws no z: plus and minus are θ itself, the same floats
    the replay writes back, and the same as θ±εz's midpoint for a real eps (up to rounding)."""
    from zo2tier.zo import fused
    from zo2tier.zo.update import LogEntry

    n = 4096 + 5
    stored = torch.randn(n, device="cuda")
    log = fused.PendingLog.build([LogEntry(t, 100 + t, 0.5 - t, 1e-2, 0.1) for t in range(3)], torch.device("cuda"))
    kw = {"param_id": 4, "decay": True, "log": log, "new_seed": 9, "sr_seed": 0, "sr_key": 0, "sr_offset": 0}
    plus, minus, out = (torch.full((n,), float("nan"), device="cuda") for _ in range(3))
    fused.arrive(stored, eps=0.0, plus=plus, minus=minus, write_to=out, **kw)
    assert torch.equal(plus, out) and torch.equal(minus, out)  # fp32 write-back: no rounding
    p1, m1 = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    fused.arrive(stored, eps=1e-3, plus=p1, minus=m1, write_to=None, **kw)
    torch.testing.assert_close((p1 + m1) / 2, out, rtol=0, atol=1e-6)
    assert not torch.equal(p1, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_stochastic_rounding_is_unbiased(dtype):
    from zo2tier.engine import causal_lm_loss  # noqa: F401 - import check only
    from zo2tier.zo import fused
    from zo2tier.zo.update import LogEntry

    n = 1 << 20  # SR noise per element is far above the signal: many elements make the estimate tight
    stored = torch.full((n,), 1.0, dtype=dtype, device="cuda")
    quantum = float(torch.finfo(dtype).eps)
    total = torch.zeros(n, device="cuda")
    steps = 50
    for t in range(steps):  # each update is 0.1 quantum along z; SR must keep the mean
        log = fused.PendingLog.build([LogEntry(t, t, 1e-1 * quantum, 1.0, 0.0)], torch.device("cuda"))
        before = stored.float()
        plus = torch.empty(n, device="cuda")
        fused.arrive(stored, param_id=1, decay=False, log=log, new_seed=0, eps=0.0, plus=plus, minus=None,
                     write_to=stored, sr_seed=t, sr_key=3, sr_offset=0)
        total += stored.float() - before
    from zo2tier.zo.rng import normal

    expected = torch.zeros(n)
    for t in range(steps):
        expected -= 1e-1 * quantum * normal(t, 1, n)
    got, want = total.cpu(), expected
    # per-element means agree in aggregate: compare the projection onto the expected direction
    assert float((got * want).sum() / (want * want).sum()) == pytest.approx(1.0, rel=0.05)


def test_fused_float_path_holds_no_fp32_block_buffer(tmp_path):
    """fp16 blocks through the fused kernel never touch the fp32 work buffer, so it is never allocated."""
    model = tiny_model("llama")
    place = {b: "host" for b in zo2tier.ZOEngine.block_names(model)}
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, device="cuda", placement=place,
                          storage={"device": "fp16", "host": "fp16"},
                          config=zo2tier.MeZOConfig(lr=1e-3, eps=1e-3, seed=0)) as engine:
        for _ in range(3):
            engine.step(tiny_batch())
        assert not engine.runner.buffers_allocated["fp32_block"]


def _run_host(tmp_path, place_on: str, storage: str, steps: int = 6, **kw):
    model = tiny_model("opt")
    cfg = zo2tier.MeZOConfig(lr=1e-3, eps=1e-3, weight_decay=0.01, seed=3)
    place = {b: place_on for b in zo2tier.ZOEngine.block_names(model)}
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, device="cuda", config=cfg, placement=place,
                          storage={"device": storage, "host": storage}, **kw) as e:
        results = [e.step(tiny_batch()) for _ in range(steps)]
        return results, e.evaluate(tiny_batch()), e.state_dict()


@pytest.mark.parametrize("storage", ["fp32", "fp16"])
@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_host_write_back_in_place_matches_all_on_device(storage, lookahead, tmp_path):
    """Every host block is updated in its upload slot and copied down from it at every step: a slot refilled
    before its D2H landed, or a block uploaded before its own D2H landed, would break equality here."""
    ref = _run_host(tmp_path / "a", "device", storage, write_back_every=1)
    got = _run_host(tmp_path / "b", "host", storage, write_back_every=1, lookahead_blocks=lookahead)
    assert [(r.loss_plus, r.loss_minus) for r in ref[0]] == [(r.loss_plus, r.loss_minus) for r in got[0]]
    assert ref[1] == got[1]
    for key in ref[2]:
        assert torch.equal(ref[2][key], got[2][key]), key


def test_fp16_host_tier_peak_holds_only_slots_scratch_and_resident(tmp_path):
    """Fused fp16 host blocks are written back from their upload slot: no D2H out buffers, no encode buffer,
    no second resident copy. The step's peak stays below slots + θ±εz scratch + the resident's stored copy
    and one fp32 work copy, plus an allowance smaller than any one of the removed buffers (each ≥ 4 MB here)."""
    import transformers as tf

    cfg = tf.OPTConfig(vocab_size=4096, hidden_size=512, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=8,
                       max_position_embeddings=64, word_embed_proj_dim=512)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    place = {b: "host" for b in zo2tier.ZOEngine.block_names(model)}
    x = torch.ones(16, 16, dtype=torch.float16, device="cuda")  # cuBLAS(Lt) workspaces come from the caching
    torch.nn.functional.linear(x, x, x[0]), x @ x, torch.bmm(x[None], x[None])  # allocator: not in the peak
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with zo2tier.ZOEngine(model, budget={"device": "1GiB", "host": "1GiB"}, device="cuda", placement=place,
                          write_back_every=1, lookahead_blocks=2,
                          config=zo2tier.MeZOConfig(lr=1e-3, eps=1e-3, seed=0)) as engine:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            engine.step(tiny_batch())
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        records = list(engine.table)
        resident = records[-1]
        assert not any(engine.runner.buffers_allocated.values())
        assert engine.tiers._cuda.n_slots == 3
        bound = (3 * max(r.stored_bytes for r in records[:-1])  # upload slots
                 + 2 * 2 * max(r.numel for r in records)  # θ+εz and θ−εz scratch, fp16
                 + resident.stored_bytes + 4 * resident.numel  # resident stored copy, one fp32 work copy
                 + (3 << 20))  # activations, logits, loss, log arrays, allocator rounding
        assert peak < bound, (peak, bound)


def test_fused_kernel_pieces_match_one_pass():
    """A parameter cut into pieces (z_offset: the piece's start in the parameter, sr_offset: in the block) draws
    the z of one pass, so int8 write-backs can replay a block range by range. A piece that starts a wrong
    number of Philox groups in would differ by O(1) everywhere; what may differ is the last bit of a few
    elements, since Triton compiles a variant per pointer alignment and the variants may contract or
    approximate differently."""
    from zo2tier.zo import fused
    from zo2tier.zo.update import LogEntry

    n, dev = 4096 + 3, torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    stored = torch.randn(n, device="cuda", generator=g)
    log = fused.PendingLog.build([LogEntry(4, 11, 0.5, 1e-2, 0.1), LogEntry(5, 12, -0.25, 1e-2, 0.1)], dev)
    kw = {"param_id": 3, "decay": True, "log": log, "new_seed": 99, "eps": 1e-2, "sr_seed": 5, "sr_key": 2}

    def run(cuts):
        plus, minus, out = (torch.zeros(n, device="cuda") for _ in range(3))
        for a, b in itertools.pairwise(cuts):
            fused.arrive(stored[a:b], plus=plus[a:b], minus=minus[a:b], write_to=out[a:b], sr_offset=10 + a,
                         z_offset=a, **kw)
        return plus, minus, out

    whole = run([0, n])
    pieces = run([0, 4, 1028, 2048, 4000, n])
    for w, p in zip(whole, pieces):
        torch.testing.assert_close(p, w, rtol=3e-7, atol=1e-7)
    wrong = torch.zeros(n - 8, device="cuda")  # a piece told the wrong start draws other z: the test can fail
    fused.arrive(stored[8:], plus=wrong, minus=None, write_to=None, sr_offset=18, z_offset=0, **kw)
    assert not torch.allclose(wrong, whole[0][8:], rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        fused.arrive(stored[2:], plus=stored[2:].clone(), minus=None, write_to=None, sr_offset=2, z_offset=2, **kw)


def _run_int8(tmp_path, monkeypatch, range_numel):
    import transformers as tf

    import zo2tier.visit.runner as runner_mod

    monkeypatch.setattr(runner_mod, "WRITE_BACK_RANGE_NUMEL", range_numel)
    torch.manual_seed(0)  # n_embd 30: biases and LayerNorms of 30 and 90 put parameters at offsets ≡ 2 (mod 4)
    model = tf.AutoModelForCausalLM.from_config(
        tf.GPT2Config(vocab_size=96, n_embd=30, n_layer=3, n_head=3, n_positions=64), dtype=torch.float32).eval()
    names = zo2tier.ZOEngine.block_names(model)
    place = {b: ("host", "disk", "device")[i % 3] for i, b in enumerate(names)}
    cfg = zo2tier.MeZOConfig(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=3)
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, device="cuda", config=cfg, placement=place,
                          storage={"device": "int8", "host": "int8", "disk": "int8"}, write_back_every=2) as e:
        results = [e.step(tiny_batch()) for _ in range(5)]
        return results, e.evaluate(tiny_batch()), e.state_dict(), e.runner.buffers_allocated["fp32_block"]


def _assert_int8_runs_agree(ref, got, rel=1e-5):
    """Losses to ``rel``, the evaluation to 1e-3, every weight within 1.5 int8 quanta of the widest group."""
    for r, q in zip(ref[0], got[0]):
        assert q.loss_plus == pytest.approx(r.loss_plus, rel=rel), (q.step, q.loss_plus, r.loss_plus)
        assert q.loss_minus == pytest.approx(r.loss_minus, rel=rel), (q.step, q.loss_minus, r.loss_minus)
    assert got[1] == pytest.approx(ref[1], rel=1e-3)
    quantum = max(float(t.abs().max()) for t in ref[2].values()) / 127
    worst = max(float((ref[2][k].float() - got[2][k].float()).abs().max()) for k in ref[2])
    assert worst <= 1.5 * quantum, (worst, quantum)


def test_int8_write_back_range_by_range_matches_one_range(tmp_path, monkeypatch):
    """int8 write-backs replay and encode 256 elements at a time (ranges that cut parameters at offsets that
    are not multiples of 4) and match one range over the whole block, and no fp32 block buffer is ever
    allocated. Not bit for bit: a last-bit difference (see the pieces test above) can flip one stochastic
    rounding, which moves the next losses and so every later update by a hair, and the next write-backs
    round a little differently everywhere. So: losses to 1e-5, and every weight within one int8 quantum
    of the model's widest group. A piece drawing the wrong z would move weights by lr·g·z, far more."""
    ref = _run_int8(tmp_path / "a", monkeypatch, 1 << 22)
    got = _run_int8(tmp_path / "b", monkeypatch, 256)
    _assert_int8_runs_agree(ref, got)
    assert not ref[3] and not got[3]


def _run_int8_parts(tmp_path, monkeypatch, by_part, write_back_every=4):
    import dataclasses

    import transformers as tf

    import zo2tier.visit.runner as runner_mod
    from zo2tier.visit.fused_visit import WritePlan

    monkeypatch.setattr(runner_mod, "WRITE_BACK_RANGE_NUMEL", 1 << 14)  # ranges that cut the MLP's matrices
    taken = []
    torch.manual_seed(0)  # hidden 128: every part (attention, MLP, norms) starts on an int8 group
    model = tf.AutoModelForCausalLM.from_config(
        tf.OPTConfig(vocab_size=96, hidden_size=128, ffn_dim=256, num_hidden_layers=3, num_attention_heads=4,
                     max_position_embeddings=64, word_embed_proj_dim=128), dtype=torch.float32).eval()
    names = zo2tier.ZOEngine.block_names(model)
    place = {b: ("host", "disk", "host")[i % 3] for i, b in enumerate(names)}
    cfg = zo2tier.MeZOConfig(lr=1e-3, eps=1e-3, weight_decay=0.01, seed=3)
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, device="cuda", config=cfg, placement=place,
                          storage={"device": "fp32", "host": "int8", "disk": "int8"},
                          write_back_every=write_back_every) as e:
        visits = e.runner.visits
        if not by_part:  # no block tiles on int8 groups: every int8 write-back is whole-block at open
            visits.bindings = dataclasses.replace(visits.bindings, on_groups=frozenset())
        real = visits.open

        def spy(record, **kw):
            visit = real(record, **kw)
            taken.append(visit.plan is WritePlan.INT8_BY_PART)
            return visit

        visits.open = spy
        results = [e.step(tiny_batch()) for _ in range(6)]  # blocks 2, 1, 0 written at steps 2, 3, 4
        return results, e.evaluate(tiny_batch()), e.state_dict(), any(taken)


def test_int8_write_back_part_by_part_matches_one_pass_then_parts(tmp_path, monkeypatch):
    """An int8 block written back in a forward is replayed once: each part's pass builds its θ±εz and
    re-encodes its span, and the parts go down one by one. It matches replaying the whole block for the
    encode and then each part again. Not bit for bit, as in the range test above: the two paths run kernel
    variants that may round θ's last bit differently, which can flip a stochastic rounding. (At lr 1e-2 the
    run diverges, 4.6 to 8.5 in 8 steps, and the flips grew to 3e-4 of the loss; hence a small lr and few
    steps here.) A piece with the wrong z, scales or bytes would move a loss by about eps·g, 1e-3."""
    ref = _run_int8_parts(tmp_path / "a", monkeypatch, False)
    got = _run_int8_parts(tmp_path / "b", monkeypatch, True)
    assert got[3] and not ref[3]  # the part-by-part path ran, and only where asked
    _assert_int8_runs_agree(ref, got)
    moved = _run_int8_parts(tmp_path / "c", monkeypatch, True, write_back_every=1)  # one pending: not by part
    assert not moved[3]


def test_exact_pinned_chunks_are_locked_at_their_size():
    """On CUDA the host tier's chunks are locked in place (cudaHostRegister) at whole multiples of the
    buffers asked for: no power-of-two rounding. (torch's is_pinned() says False for registered memory; the
    copies are DMA all the same: the bench's bus rates show it.)"""
    from zo2tier.store.io import ALIGN_BYTES, PinnedPool

    size = 3 * ALIGN_BYTES
    pool = PinnedPool(pin=True, chunk_bytes=10 * ALIGN_BYTES, total_bytes=5 * size, exact=True)
    bufs = [pool.take(size) for _ in range(5)]
    assert [b.data_ptr() % ALIGN_BYTES for b in bufs] == [0] * 5
    assert pool.pinned_bytes == 5 * size, pool.pinned_bytes  # 3 buffers in one chunk, 2 in an exact second
    x = torch.arange(size, dtype=torch.int64).to(torch.uint8)
    bufs[4].copy_(x)
    on_gpu = bufs[4].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), x)
    pool.close()


@pytest.mark.parametrize("estimator,q", [("mezo", 3), ("fzoo", 4)])
def test_several_perturbations_are_the_same_on_every_tier(tmp_path, estimator, q):
    """q perturbations per step on the fused path (the clean θ built once per part, every copy's θ±εz from
    it): blocks spread over device, host and disk give the losses and weights of all on the device."""
    out = []
    for name, place in (("device", lambda names: {b: "device" for b in names}), ("spread", spread)):
        model = tiny_model("opt")
        cfg = zo2tier.MeZOConfig(lr=1e-3, eps=1e-3, weight_decay=0.01, seed=3, estimator=estimator,
                                 n_perturbations=q)
        with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path / name, device="cuda", config=cfg,
                              placement=place(zo2tier.ZOEngine.block_names(model)), write_back_every=2) as e:
            results = [(r.loss_plus, r.loss_minus, r.projected_grad) for r in (e.step(tiny_batch()) for _ in range(4))]
            out.append((results, e.state_dict(), len(e.log)))
    assert out[0][0] == out[1][0] and out[0][2] == out[1][2] == 4 * q
    assert all(torch.equal(out[0][1][k], out[1][1][k]) for k in out[0][1])


@pytest.mark.parametrize(("estimator", "q"), [("mezo", 1), ("fzoo", 3)])
def test_revert_and_a_carried_log_on_the_fused_path(tmp_path, estimator, q):
    """revert_to and extend_log on CUDA: the inverse entries and a carried log replay through the fused
    kernels, so spread tiers equal all on the device bit for bit, the revert lands on the prefix's weights
    up to fp32 rounding, and a fresh engine plus the log is the run."""
    cfg = zo2tier.MeZOConfig(lr=1e-2 if estimator == "fzoo" else 1e-3, eps=1e-2, weight_decay=0.01, seed=5,
                             estimator=estimator, n_perturbations=q)

    def engine(name, place):
        model = tiny_model("llama")
        names = zo2tier.ZOEngine.block_names(model)
        return zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path / name, device="cuda", config=cfg,
                                placement=place(names), write_back_every=2)

    on_device = lambda names: dict.fromkeys(names, "device")
    out = []
    for name, place in (("device", on_device), ("spread", spread)):
        with engine(name, place) as e:
            for s in range(2):
                e.step(tiny_batch(seed=s))
            prefix = e.state_dict()
            for s in range(2, 5):
                e.step(tiny_batch(seed=s))
            saved = list(e.log)
            assert e.revert_to(2 * q) == 3 * q
            out.append((prefix, e.state_dict(), saved))
    (prefix, reverted, saved), (_, reverted_spread, _) = out
    assert all(torch.equal(reverted[k], reverted_spread[k]) for k in reverted)
    for k in prefix:
        torch.testing.assert_close(reverted[k], prefix[k], rtol=1e-5, atol=1e-6)
    with engine("carried", spread) as fresh, engine("run", spread) as run:
        fresh.extend_log(saved)
        for s in range(5):
            run.step(tiny_batch(seed=s))
        got, want = fresh.state_dict(), run.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.filterwarnings("error:.*cannot run its copies stacked")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_stacked_copies_on_cuda_compute_what_one_copy_at_a_time_computes(arch, dtype, tmp_path, monkeypatch):
    """CUDA stacks a step's copies by default (zo2tier.plan.STACK_BYTES): every part runs stacked (no fallback
    warning), on the fused path, and gives the losses of the copies run one at a time to rounding."""
    from zo2tier import plan
    from zo2tier.model import proxy

    monkeypatch.setattr(proxy, "_UNSTACKABLE", set())
    calls = []
    real = proxy.run_stacked
    monkeypatch.setattr(proxy, "run_stacked", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    out = []
    for stack in (plan.STACK_BYTES["cuda"], 0):
        monkeypatch.setattr(plan, "STACK_BYTES", {"cuda": stack})
        calls.clear()
        model = tiny_model(arch).to(dtype)
        cfg = zo2tier.MeZOConfig(lr=1e-3, eps=1e-2, seed=3, estimator="fzoo", n_perturbations=4)
        with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path / str(stack), device="cuda", config=cfg,
                              placement=spread(zo2tier.ZOEngine.block_names(model))) as e:
            losses = [(r.loss_plus, r.loss_minus) for r in (e.step(tiny_batch()) for _ in range(2))]
        out.append((losses, bool(calls)))
    (stacked, used), (looped, unused) = out
    assert used and not unused
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert [x for pair in stacked for x in pair] == pytest.approx([x for pair in looped for x in pair], rel=tol)
