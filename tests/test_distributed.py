"""Data-parallel tiered ZO over gloo: 2 spawned ranks against a 1-process run of the same global batch.

What is exact and what is not:

- Between the ranks of one data-parallel run, the update log and every weight are ``torch.equal``: each
  rank computes g from the same all-gathered per-sample values with the same arithmetic (``math.fsum``).
- Against a 1-process run (a 1-rank group, so the same per-sample reduction), g is a function of the
  per-sample (loss sum, token count) values only. Those come from a forward whose matrix products see
  B/2 rows on each rank but B rows in the 1-process run, and a GEMM may block (and so round) differently
  for a different row count. So we assert: per-sample sums agree to rtol 1e-6 (fp32 rounding of a few
  tokens' losses); then ``|Δg| <= (|ΔL+| + |ΔL−|) / 2ε`` up to float64 rounding; and each weight within
  ``Σ_t lr·|Δg_t|·6 + 4 ulp`` (|z| < 6 for every Gaussian draw here). Wherever the per-sample values
  are bit-equal at every step (the usual case on this CPU), g and the final weights must be ``torch.equal``.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import zo2tier
from zo2tier.distributed import DataParallel, ReplicaDivergenceError, reduce_rows, shard_rows
from zo2tier.zo.rng import step_seed
from zo2tier.zo.update import causal_lm_loss

BIG = {"device": "1GiB", "host": "1GiB", "disk": "1GiB"}
ROOMY = {"device": "64GiB", "host": "1GiB", "disk": "1GiB"}
CFG = {"lr": 1e-3, "eps": 1e-3, "weight_decay": 0.01, "seed": 3}
STEPS = 4


def _spread(names):
    tiers = ["device", "host", "disk", "disk"]
    return {b: tiers[i % len(tiers)] for i, b in enumerate(names)}


def _batch():
    return tiny_batch(batch=4, seq=12)  # the last row is left-padded


def _run(disk_dir, data_parallel, steps=STEPS, budget=BIG, **estimator):
    model = tiny_model("llama")
    cfg = zo2tier.MeZOConfig(**CFG, **estimator)
    place = _spread(zo2tier.ZOEngine.block_names(model))
    with zo2tier.ZOEngine(model, budget=budget, disk_dir=disk_dir, config=cfg, placement=place,
                          data_parallel=data_parallel) as engine:
        results, rows = [], []
        for _ in range(steps):
            r = engine.step(_batch())
            results.append((r.loss_plus, r.loss_minus, r.projected_grad))
            rows.append(torch.cat(engine.collective.last_rows) if hasattr(engine.collective, "last_rows") else None)
        log = [e.to_json() for e in engine.log]
        state = engine.state_dict()
        disk = engine.disk_dir
    return {"results": results, "rows": rows, "log": log, "state": state, "disk": disk}


def _guard(disk_dir, rank):
    model = tiny_model("llama")
    place = _spread(zo2tier.ZOEngine.block_names(model))
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=disk_dir, config=zo2tier.MeZOConfig(**CFG),
                          placement=place, data_parallel=DataParallel(check_every=1)) as engine:
        engine.step(_batch())  # the guard passes before step 0
        if rank == 1:  # a silent fault: one weight of block 1 (host tier) and one of the resident set
            for index in (1, len(engine.table) - 1):
                engine.table[index].data.view(torch.float32)[7] += 0.25
        try:
            engine.step(_batch())
        except ReplicaDivergenceError as exc:
            return str(exc)
    return None


def _worker(rank, world, port, out):
    import torch.distributed as dist

    from zo2tier.zo.rng import set_compile
    set_compile(False)  # the eager Philox path: same z, no compile per process
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = {"dp": _run(os.path.join(out, "dp"), None)}  # None: the WORLD group, as under torchrun
        solo = dist.new_group([0])  # every rank takes part in creating it
        if rank == 0:
            res["ref"] = _run(os.path.join(out, "ref"), DataParallel(group=solo, check_every=0))
            res["plain"] = _run(os.path.join(out, "plain"), False)
        res["q2"] = _run(os.path.join(out, "q2"), DataParallel(n_perturbations=2, check_every=2), steps=3)
        fzoo = {"estimator": "fzoo", "n_perturbations": 3}
        res["fzoo"] = _run(os.path.join(out, "fzoo"), None, steps=2, **fzoo)  # every rank runs all 4 copies
        if rank == 0:
            res["fzoo_one"] = _run(os.path.join(out, "fzoo_one"), False, steps=2, **fzoo)
        res["fzoo_auto"] = _run(os.path.join(out, "fzoo_auto"), DataParallel(n_perturbations=2, check_every=0),
                                steps=2, budget=ROOMY, estimator="fzoo", n_perturbations="auto")
        if rank == 0:  # alone, the planner's choice: FZOO's floor of 8 (room for the copies on the device)
            res["fzoo_auto_one"] = _run(os.path.join(out, "fzoo_auto_one"), False, steps=1, budget=ROOMY,
                                        estimator="fzoo", n_perturbations="auto")
        res["guard"] = _guard(os.path.join(out, "guard"), rank)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("dp"))
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def test_ranks_agree_exactly(ranks):
    a, b = ranks[0]["dp"], ranks[1]["dp"]
    assert a["log"] == b["log"] and a["results"] == b["results"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert a["disk"].endswith("rank0") and b["disk"].endswith("rank1")  # each rank its own disk_dir


def test_two_ranks_match_one_process(ranks):
    dp, ref = ranks[0]["dp"], ranks[0]["ref"]
    assert [e[:2] for e in dp["log"]] == [e[:2] for e in ref["log"]]  # same steps, same seeds
    assert [e[1] for e in dp["log"]] == [step_seed(CFG["seed"], t) for t in range(STEPS)]
    exact = True
    bound = 0.0
    for t in range(STEPS):
        rd, rr = dp["rows"][t], ref["rows"][t]
        assert rd.shape == rr.shape == (4, 4)  # per sample: [sum+, count+, sum-, count-]
        assert torch.equal(rd[:, 1], rr[:, 1]) and torch.equal(rd[:, 3], rr[:, 3])  # token counts
        torch.testing.assert_close(rd, rr, rtol=1e-6, atol=0.0)
        exact &= torch.equal(rd, rr)
        (lp_d, lm_d, g_d), (lp_r, lm_r, g_r) = dp["results"][t], ref["results"][t]
        dg = abs(g_d - g_r)
        assert dg <= (abs(lp_d - lp_r) + abs(lm_d - lm_r)) / (2 * CFG["eps"]) + 1e-9 * abs(g_r), t
        bound += CFG["lr"] * dg * 6.0
    if exact:  # same per-sample values -> the fixed-order reduction gives the same bits
        assert dp["log"] == ref["log"]
        for key in ref["state"]:
            assert torch.equal(dp["state"][key], ref["state"][key]), key
    for key in ref["state"]:
        diff = (dp["state"][key] - ref["state"][key]).abs().max().item()
        ulp = torch.finfo(torch.float32).eps * ref["state"][key].abs().max().item()
        assert diff <= bound + 4 * ulp, (key, diff, bound)


def test_one_rank_group_matches_plain_engine(ranks):
    """The plain engine averages in fp32 (``F.cross_entropy``); the DP path sums per sample in float64."""
    ref, plain = ranks[0]["ref"], ranks[0]["plain"]
    (lp_r, lm_r, _), (lp_p, lm_p, _) = ref["results"][0], plain["results"][0]
    assert lp_r == pytest.approx(lp_p, rel=1e-6) and lm_r == pytest.approx(lm_p, rel=1e-6)


def test_guard_names_the_first_diverging_block(ranks):
    for r in range(2):
        msg = ranks[r]["guard"]
        assert msg is not None, f"rank {r} did not detect the divergence"
        assert "'model.layers.1' (index 1) is the first that differs" in msg, msg
        assert "rank 1" in msg


def test_n_perturbations(ranks):
    """q=2 on 2 ranks: rank k evaluates seed index k on its half of the batch; 2 log entries per step."""
    a, b = ranks[0]["q2"], ranks[1]["q2"]
    assert a["log"] == b["log"]
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert len(a["log"]) == 6
    for i, (step, seed, g, lr, wd) in enumerate(a["log"]):
        assert (step, seed, lr, wd) == (i, step_seed(CFG["seed"], i), CFG["lr"] / 2, CFG["weight_decay"])
    for t in range(3):  # each reported g is the mean of its two estimates
        assert a["results"][t][2] == pytest.approx((a["log"][2 * t][2] + a["log"][2 * t + 1][2]) / 2, rel=1e-12)
    # step 0 against a plain two-pass reference: g_k from θ0 ± εz(seed_k) on rank k's rows
    from zo2tier.zo.rng import normal

    model = tiny_model("llama")
    specs = zo2tier.ZOEngine(tiny_model("llama"), budget=BIG, data_parallel=False).layout.params
    named = dict(model.named_parameters())
    clean = {n: p.detach().clone() for n, p in named.items()}
    batch = _batch()
    for k in range(2):
        lo, hi = shard_rows(4, k, 2)
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                for spec in specs:
                    z = normal(step_seed(CFG["seed"], k), spec.param_id, spec.numel).view(spec.shape)
                    named[spec.name].copy_(clean[spec.name] + sign * CFG["eps"] * z)
                logits = model(input_ids=batch["input_ids"][lo:hi], attention_mask=batch["attention_mask"][lo:hi],
                               use_cache=False).logits
            losses.append(causal_lm_loss(logits, batch["labels"][lo:hi]))
        g_ref = (losses[0] - losses[1]) / (2 * CFG["eps"])
        assert a["log"][k][2] == pytest.approx(g_ref, abs=2e-6 * max(losses) / CFG["eps"]), k


def test_an_estimator_with_several_perturbations_matches_one_process(ranks):
    """FZOO with q = 3 over 2 ranks (each runs the clean copy and the 3 perturbed ones on its half of the
    batch, the rows are gathered): the same log as one process on the whole batch, to fp32 rounding."""
    a, b, one = ranks[0]["fzoo"], ranks[1]["fzoo"], ranks[0]["fzoo_one"]
    assert a["log"] == b["log"] and len(a["log"]) == 6
    assert [e[:2] for e in a["log"]] == [e[:2] for e in one["log"]]  # same entries, same seeds
    for got, want in zip(a["log"], one["log"]):
        assert got[2] == pytest.approx(want[2], abs=2e-2), (got, want)  # g_k = (l_k - l_0)/σ is O(1)
    for key in one["state"]:
        torch.testing.assert_close(a["state"][key], one["state"][key], rtol=0, atol=5e-5)  # steps move ~lr = 1e-3


def test_reduce_rows_is_order_free_and_token_weighted():
    rows = [torch.tensor([[3.0, 2.0, 1.0, 2.0], [0.5, 1.0, 0.25, 1.0]], dtype=torch.float64),
            torch.tensor([[6.0, 3.0, 3.0, 3.0]], dtype=torch.float64)]
    assert reduce_rows(rows, 2) == [9.5 / 6, 4.25 / 6]
    assert reduce_rows([rows[1], rows[0]], 2) == reduce_rows(rows, 2)
    skipped = [torch.tensor([[3.0, 2.0, 0.0, 0.0]], dtype=torch.float64),  # rank 0 ran copy 0 only
               torch.tensor([[0.0, 0.0, 5.0, 4.0]], dtype=torch.float64)]
    assert reduce_rows(skipped, 2) == [1.5, 1.25]
    assert math.isnan(reduce_rows([torch.zeros(1, 2, dtype=torch.float64)], 1)[0])


def test_shard_rows_and_validation():
    assert [shard_rows(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(ValueError, match="at least 2"):
        shard_rows(1, 0, 2)
    with pytest.raises(ValueError, match="n_perturbations"):
        DataParallel(n_perturbations=0)
    with pytest.raises(ValueError, match="initialised"):
        zo2tier.ZOEngine(tiny_model("llama"), budget=BIG, data_parallel=DataParallel())


def test_finetune_entry_gives_each_rank_its_gpu_and_out_dir():
    from zo2tier.finetune import LaunchEnv, rank_argv

    assert LaunchEnv.from_environ({}) is None
    env = LaunchEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    argv = ["--model", "m", "--device=cuda", "--out", "runs/out/", "--disk-dir", "runs/disk"]
    assert rank_argv(argv, env) == ["--model", "m", "--device=cuda:1", "--out", "runs/out.rank1",
                                    "--disk-dir", "runs/disk", "--no-progress"]
    assert rank_argv(argv, LaunchEnv(0, 0, 2)) == ["--model", "m", "--device=cuda:0", "--out", "runs/out/",
                                                   "--disk-dir", "runs/disk"]
    with pytest.raises(ValueError, match="RANK=2"):
        LaunchEnv.from_environ({"RANK": "2", "WORLD_SIZE": "2"})


def test_auto_with_perturbations_spread_over_ranks_takes_the_spread(ranks):
    """q = "auto" beside DataParallel(n_perturbations=2): the ranks set q (2), not the planner's floor (8 for
    FZOO), so the step runs instead of refusing a q the user never set."""
    a, b = ranks[0]["fzoo_auto"], ranks[1]["fzoo_auto"]
    assert a["log"] == b["log"] and len(a["log"]) == 2 * 2
    assert len(ranks[0]["fzoo_auto_one"]["log"]) == 8  # without the ranks, auto takes 8
    assert all(lr == CFG["lr"] / 2 for _, _, _, lr, _ in a["log"])


def test_auto_plans_for_the_widest_shard_on_every_rank():
    """9 rows over 2 ranks shard as 5 and 4: q = "auto" plans for 5 rows on both ranks, so an uneven split
    cannot make them pick different q (without sharding, each rank's batch is the whole)."""
    from zo2tier.distributed import DataParallel, Replicas

    batch = {"input_ids": torch.zeros(9, 4, dtype=torch.long)}
    for shard_batch, want in ((True, 5), (False, 9)):
        for rank in (0, 1):
            replicas = object.__new__(Replicas)  # no process group needed for the arithmetic
            replicas.spec, replicas.rank, replicas.world_size = DataParallel(shard_batch=shard_batch), rank, 2
            local = replicas.shard(batch)["input_ids"].shape[0]
            assert replicas.widest_shard(local) == want, (shard_batch, rank)
