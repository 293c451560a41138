"""The keyed perturbation RNG (zo2tier.zo.rng) and the CPU kernels against its spec (docs/rng.md)."""

from __future__ import annotations

import math

import pytest
import torch

from zo2tier.zo import kernels, rng

M32 = 0xFFFFFFFF


@pytest.fixture(autouse=True)
def eager_only(monkeypatch):
    """Run these tests on the eager path (compiling costs ~20 s); test_compiled_* opts back in."""
    if not rng._compile_tried:
        monkeypatch.setattr(rng, "_compile_tried", True)
        monkeypatch.setattr(rng, "_compiled", None)


# ----------------------------------------------------------------------------- independent reference


def ref_philox(c: list[int], k: list[int]) -> list[int]:
    """Scalar Philox4x32-10 in plain Python ints, written from the Random123 paper."""
    c, (k0, k1) = list(c), k
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & M32, (p0 >> 32) ^ c[3] ^ k1, p0 & M32]
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c


def ref_words(k0: int, k1: int, n: int) -> list[int]:
    """Words of elements 0 .. n-1: element i is word i % 4 of counter (i // 4, 0, 0, 0)."""
    return [ref_philox([i // 4, 0, 0, 0], [k0, k1])[i % 4] for i in range(n)]


def ref_uniform(w: int) -> float:
    return ((w >> 9) + 0.5) * 2.0**-23


def ref_gaussian64(k0: int, k1: int, n: int) -> list[float]:
    """Box-Muller in float64 (the spec's formulas without float32 rounding)."""
    u = [ref_uniform(w) for w in ref_words(k0, k1, 4 * ((n + 3) // 4))]
    z = []
    for g in range(0, len(u), 4):
        for a, b in ((g, g + 1), (g + 2, g + 3)):
            r = math.sqrt(-2.0 * math.log(u[a]))
            z += [r * math.cos(2 * math.pi * u[b]), r * math.sin(2 * math.pi * u[b])]
    return z[:n]


# ----------------------------------------------------------------------------- Philox


# Random123 kat_vectors, "philox4x32 10" lines: counter (4 words), key (2 words), expected (4 words).
KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([M32] * 4, [M32] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert [int(w) for w in rng.philox4x32_10(*counter, *key)] == expected
    assert ref_philox(counter, key) == expected


def test_philox_tensor_counters_broadcast():
    gen = torch.Generator().manual_seed(0)
    c = [torch.randint(0, 2**32, (50,), generator=gen) for _ in range(4)]
    words = rng.philox4x32_10(c[0], c[1], c[2], 5, 0x12345678, 0x9ABCDEF0)
    for i in range(50):
        ctr = [int(c[0][i]), int(c[1][i]), int(c[2][i]), 5]
        assert [int(w[i]) for w in words] == ref_philox(ctr, [0x12345678, 0x9ABCDEF0])


def test_eager_words_match_reference():
    ws = rng._Workspace(64, torch.device("cpu"))
    for k0, k1, g0 in [(0, 0, 0), (7, 2**31, 2**32 - 64), (M32, M32, 1000)]:
        words = rng._words_eager(g0, 64, k0, k1, ws)
        for g in (0, 1, 63):
            assert [int(w[g]) for w in words] == ref_philox([g0 + g, 0, 0, 0], [k0, k1])


# ----------------------------------------------------------------------------- golden vectors

GOLDEN = {
    (0, 0): [0.9911375045776367, -0.9246628284454346, -0.6176090836524963, -0.48206833004951477,
             -0.15363818407058716, 0.18082581460475922, 0.8317352533340454, 0.19743961095809937],
    (12345, 7): [-0.8075949549674988, 0.092713363468647, -0.4861917197704315, 1.4172102212905884,
                 -0.4097714424133301, -2.3563995361328125, -1.1266100406646729, -0.06842329353094101],
    (2**32 - 1, 2**31): [0.8735530376434326, 1.1230297088623047, -0.0884719118475914, -0.485601007938385,
                         -0.04205160588026047, -1.610913634300232, -0.3872791528701782, 1.0451487302780151],
}  # fmt: skip
GOLDEN_RADEMACHER = {
    (0, 0): [1, -1, -1, -1, -1, 1, -1, 1],
    (12345, 7): [-1, 1, 1, 1, 1, -1, -1, -1],
    (2**32 - 1, 2**31): [1, 1, -1, -1, 1, -1, -1, 1],
}
GOLDEN_SR = [0.6410538554191589, 0.5057896971702576, 0.009335458278656006, 0.3555923104286194,
             0.8851870894432068, 0.1602146029472351, 0.26028376817703247, 0.10473912954330444]  # fmt: skip


@pytest.mark.parametrize("key", list(GOLDEN))
def test_golden_vectors(key):
    assert torch.equal(rng.normal(*key, 8), torch.tensor(GOLDEN[key]))
    assert rng.normal(*key, 8, kind="rademacher").tolist() == GOLDEN_RADEMACHER[key]


@pytest.mark.parametrize("key", list(GOLDEN))
def test_golden_vectors_against_python_reference(key):
    ref = ref_gaussian64(*key, 8)
    assert max(abs(a - b) for a, b in zip(GOLDEN[key], ref)) < 2e-6
    signs = [1 - 2 * (w >> 31) for w in ref_words(*key, 8)]
    assert signs == GOLDEN_RADEMACHER[key]


def test_sr_uniform_golden_and_exact():
    assert rng.sr_uniform(0, 0, 8).tolist() == GOLDEN_SR
    # k1 carries the stochastic-rounding domain bit; the uniform is exact, so compare exactly
    want = [ref_uniform(w) for w in ref_words(5, 3 | 0x80000000, 11)]
    assert rng.sr_uniform(5, 3, 11).tolist() == want


# ----------------------------------------------------------------------------- offsets and chunks


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_offset_slices_match_longer_draw(kind):
    full = rng.normal(99, 4, 20_000, kind=kind)
    for offset, n in [(1, 1), (2, 9), (3, 4096), (5, 3), (4097, 1000), (19_999, 1), (6, 0)]:
        assert torch.equal(rng.normal(99, 4, n, offset=offset, kind=kind), full[offset : offset + n])


def test_chunk_boundaries(monkeypatch):
    monkeypatch.setitem(rng._CHUNK_GROUPS, "cpu", 16)  # 64 elements per chunk
    monkeypatch.setattr(rng, "_local", type(rng._local)())
    small_chunks = rng.normal(3, 1, 1003, offset=7)
    monkeypatch.setattr(rng, "_local", type(rng._local)())
    monkeypatch.setitem(rng._CHUNK_GROUPS, "cpu", 1 << 16)
    assert torch.equal(small_chunks, rng.normal(3, 1, 1003, offset=7))
    assert torch.equal(rng.sr_uniform(3, 1, 10, offset=1), rng.sr_uniform(3, 1, 11)[1:])


def test_last_counter_group():
    last = 4 * 2**32 - 3
    assert torch.equal(rng.normal(1, 2, 3, offset=last), rng.normal(1, 2, 5, offset=last - 2)[2:])


# ----------------------------------------------------------------------------- statistics and math


def test_gaussian_statistics():
    z = rng.normal(2024, 1, 1_000_000).double()
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1) < 5e-3
    assert abs((z**3).mean().item()) < 2e-2 and abs((z**4).mean().item() - 3) < 3e-2
    assert z.abs().max().item() < 5.8  # sqrt(-2 ln 2**-24) bounds |z|


def test_rademacher_balanced():
    z = rng.normal(5, 6, 1_000_000, kind="rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.double().mean().item()) < 5e-3


def test_uniforms_inside_open_interval():
    u = rng.sr_uniform(1, 1, 1_000_000)
    assert u.min().item() >= 2.0**-24 and u.max().item() <= 1 - 2.0**-24
    assert abs(u.double().mean().item() - 0.5) < 2e-3


def test_float32_math_accuracy():
    u = (torch.arange(1 << 20, dtype=torch.float32) * 8 + 0.5) * 2.0**-23  # spans (0, 1)
    ud = u.double()
    assert (rng._ln(u).double() - ud.log()).abs().max().item() < 3e-6  # |ln u| <= 17
    v = rng._ln(u) * -2.0
    assert ((rng._sqrt(v).double() - v.double().sqrt()) / v.double().sqrt()).abs().max().item() < 4e-7
    cos_t, sin_t = rng._sincos_2pi(u)
    assert (cos_t.double() - torch.cos(2 * math.pi * ud)).abs().max().item() < 2e-7
    assert (sin_t.double() - torch.sin(2 * math.pi * ud)).abs().max().item() < 2e-7


# ----------------------------------------------------------------------------- step seeds and errors


def test_step_seed():
    assert rng.step_seed(0, 0) == 0x7B1DCDAF  # low half of splitmix64's first output for state 0
    assert [rng.step_seed(0, 1), rng.step_seed(1, 0), rng.step_seed(M32, M32)] == [
        2298633409,
        2743206200,
        459615264,
    ]
    seeds = {rng.step_seed(42, s) for s in range(10_000)}
    assert len(seeds) == 10_000 and all(0 <= s <= M32 for s in seeds)


@pytest.mark.parametrize(
    "call",
    [
        lambda: rng.step_seed(-1, 0),
        lambda: rng.step_seed(0, 2**32),
        lambda: rng.normal(2**32, 0, 4),
        lambda: rng.normal(0, -1, 4),
        lambda: rng.normal(0, 2**32, 4),
        lambda: rng.normal(0, 0, -1),
        lambda: rng.normal(0, 0, 4, offset=-2),
        lambda: rng.normal(0, 0, 8, offset=2**34 - 4),
        lambda: rng.normal(0, 0, 4, kind="uniform"),
        lambda: rng.normal(True, 0, 4),
        lambda: rng.normal(1.0, 0, 4),
        lambda: rng.sr_uniform(0, 2**31, 4),
        lambda: rng.philox4x32_10(torch.tensor([1], dtype=torch.int32), 0, 0, 0, 0, 0),
        lambda: rng.philox4x32_10(torch.tensor([2**32]), 0, 0, 0, 0, 0),
        lambda: rng.philox4x32_10(0, 0, 0, 0, 2**32, 0),
    ],
)
def test_argument_errors(call):
    with pytest.raises((TypeError, ValueError)):
        call()


def test_error_message_names_value_and_fix():
    with pytest.raises(ValueError, match=r"param_id=2147483648 .*2\*\*31"):
        rng.sr_uniform(0, 2**31, 4)


# ----------------------------------------------------------------------------- CPU kernels


@pytest.mark.parametrize("src,dst", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float32), (torch.float64, torch.bfloat16)])  # fmt: skip
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_perturb_into_matches_documented_op_order(src, dst, kind):
    theta = torch.randn(5003, generator=torch.Generator().manual_seed(0)).to(src)
    for scale in (1e-3, -2e-3):
        out = torch.empty(5003, dtype=dst)
        assert kernels.perturb_into(theta, out, step_seed=8, param_id=1, scale=scale, kind=kind) is out
        z = rng.normal(8, 1, 5003, kind=kind)
        want = (theta.to(torch.float32) + rng.f32(scale) * z).to(dst)
        assert torch.equal(out, want)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_apply_update_matches_documented_op_order(wd):
    theta = torch.randn(70_001, generator=torch.Generator().manual_seed(1))
    before = theta.clone()
    lr, g = 1e-3, -3.25
    assert (
        kernels.apply_update_(theta, step_seed=4, param_id=6, lr=lr, projected_grad=g, weight_decay=wd)
        is theta
    )
    d = rng.f32(lr * g) * rng.normal(4, 6, 70_001)
    if wd:
        d = d + rng.f32(lr * wd) * before
    assert torch.equal(theta, before - d)
    naive = before - lr * (g * rng.normal(4, 6, 70_001) + wd * before)
    torch.testing.assert_close(theta, naive, rtol=0, atol=1e-6)


def test_perturb_plus_minus_is_symmetric():
    theta = torch.randn(999)
    plus, minus = torch.empty(999), torch.empty(999)
    kernels.perturb_into(theta, plus, step_seed=1, param_id=2, scale=1e-3)
    kernels.perturb_into(theta, minus, step_seed=1, param_id=2, scale=-1e-3)
    torch.testing.assert_close((plus + minus) / 2, theta, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "call",
    [
        lambda: kernels.perturb_into(torch.zeros(2, 3), torch.zeros(6), step_seed=0, param_id=0, scale=1.0),
        lambda: kernels.perturb_into(torch.zeros(8)[::2], torch.zeros(4), step_seed=0, param_id=0, scale=1.0),
        lambda: kernels.perturb_into(torch.zeros(4), torch.zeros(5), step_seed=0, param_id=0, scale=1.0),
        lambda: kernels.perturb_into(torch.zeros(4, dtype=torch.int32), torch.zeros(4), step_seed=0, param_id=0, scale=1.0),
        lambda: kernels.perturb_into(torch.zeros(4), torch.zeros(4), step_seed=0, param_id=0, scale=math.nan),
        lambda: kernels.perturb_into(torch.zeros(4), torch.zeros(4), step_seed=0, param_id=0, scale=1.0, kind="x"),
        lambda: kernels.apply_update_(torch.zeros(4, dtype=torch.bfloat16), step_seed=0, param_id=0, lr=1.0,
                                      projected_grad=1.0, weight_decay=0.0),
        lambda: kernels.apply_update_(torch.zeros(4), step_seed=0, param_id=0, lr=1.0, projected_grad=math.inf,
                                      weight_decay=0.0),
    ],
)  # fmt: skip
def test_kernel_argument_errors(call):
    with pytest.raises((TypeError, ValueError)):
        call()


# ----------------------------------------------------------------------------- compiled path


def test_compile_waits_for_volume(monkeypatch):
    calls = []
    monkeypatch.setattr(rng, "_compile_tried", False)
    monkeypatch.setattr(rng, "_eager_numel", 0)
    monkeypatch.setattr(rng, "_COMPILE_AFTER_NUMEL", 1000)
    monkeypatch.setattr(rng, "_compiled_kernel", lambda: calls.append(1))  # None: stay eager
    rng.normal(1, 1, 999)  # 250 groups = 1000 elements generated
    assert calls == []
    rng.normal(1, 1, 8)
    assert calls == [1]


@pytest.fixture
def compiled(monkeypatch):
    """The compiled kernel (compiling it once per process), or skip when it is unavailable."""
    monkeypatch.undo()  # drop eager_only
    fn = rng._compiled_kernel()
    if fn is None:
        pytest.skip("torch.compile is disabled or did not reproduce the eager path")
    return fn


@pytest.mark.slow
def test_compiled_matches_eager(compiled):
    ws = rng._Workspace(1 << 16, torch.device("cpu"))
    for kind in ("gaussian", "rademacher", "uniform"):
        for k0, k1, g0, n in [(0, 0, 0, 1 << 16), (77, 2**31 + 5, 12_345, 4099), (M32, M32, 2**32 - 9, 9)]:
            got = rng._call_compiled(compiled, g0, n, k0, k1, kind)
            assert torch.equal(got, rng._values_eager(g0, n, k0, k1, kind, ws)), (kind, k0, k1)
    assert torch.equal(rng.normal(0, 0, 8), torch.tensor(GOLDEN[(0, 0)]))
