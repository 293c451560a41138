"""A shared read-only disk tier (``DataParallel(shared_disk=True)``) over gloo: 2 spawned ranks.

The shared run must equal, ``torch.equal``, the run where each rank has its own directory (fp32 storage, so
the time of a write-back does not change a weight), even though its disk blocks are written at other steps:
every 3 log entries, all together, by rank 0 only. Between consolidations no block file may change.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.distributed
from test_distributed import BIG, CFG, _batch, _free_port, _spread
from tiny_models import tiny_model

import zo2tier
from zo2tier.distributed import DataParallel

STEPS = 4
K_SHARED = 3  # write_back_every["disk"]: consolidate once 3 updates are pending (before step 3, and at close)


def _files(directory):
    """Every block file in ``directory``: name -> (sha256, mtime_ns)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("block_"):
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[name] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def _run(disk_dir, data_parallel, write_back_every=None):
    """Train STEPS steps; with a shared disk tier, also snapshot its block files after each step.

    Only a shared disk tier is snapshotted during training: there no rank writes a block between
    consolidations, and each consolidation finishes (files renamed, old ones deleted) before the collective
    that ends it returns on every rank. An own directory is written back by the engine's writer threads
    while the next step runs, so a listing of it may name a file that is renamed or deleted before it is read.
    """
    model = tiny_model("llama")
    place = _spread(zo2tier.ZOEngine.block_names(model))
    watch = data_parallel.shared_disk
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=disk_dir, config=zo2tier.MeZOConfig(**CFG),
                          placement=place, write_back_every=write_back_every,
                          data_parallel=data_parallel) as engine:
        snaps, merged = [_files(engine.disk_dir) if watch else None], [0]
        for _ in range(STEPS):
            engine.step(_batch())
            snaps.append(_files(engine.disk_dir) if watch else None)
            merged.append(engine.collective.n_consolidations)
        paths = [r.path for r in engine.table.by_tier("disk")]
        log = [e.to_json() for e in engine.log]
        state = engine.state_dict()
    torch.distributed.barrier()  # rank 0 may still be committing its close() when the others are done
    return {"snaps": snaps, "merged": merged, "closed": engine.collective.n_consolidations, "paths": paths, "log": log,
            "state": state, "disk": engine.disk_dir, "final": _files(engine.disk_dir)}


def _error(fn):
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


def _worker(rank, world, port, out):
    import torch.distributed as dist

    from zo2tier.zo.rng import set_compile
    set_compile(False)  # the eager Philox path: same z, no compile per process
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = {"own": _run(os.path.join(out, "own"), DataParallel(check_every=0))}
        shared = DataParallel(shared_disk=True, check_every=1)
        res["shared"] = _run(os.path.join(out, "shared"), shared, write_back_every={"disk": K_SHARED})
        res["no_dir"] = _error(lambda: zo2tier.ZOEngine(tiny_model("llama"), budget=BIG, data_parallel=shared))
        model = tiny_model("llama")
        res["other_dir"] = _error(lambda: zo2tier.ZOEngine(
            model, budget=BIG, disk_dir=os.path.join(out, f"mismatch{rank}"), data_parallel=shared,
            placement=_spread(zo2tier.ZOEngine.block_names(model))))
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("dp_shared"))
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return out, [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def test_shared_disk_matches_own_directories_exactly(ranks):
    _, (a, b) = ranks
    for run in (a["shared"], b["shared"]):
        assert run["log"] == a["own"]["log"]
        assert run["state"].keys() == a["own"]["state"].keys()
        for key in run["state"]:
            assert torch.equal(run["state"][key], a["own"]["state"][key]), key
    assert a["shared"]["paths"] == b["shared"]["paths"]  # both ranks read the same files


def test_one_copy_on_disk_and_no_rank_directories(ranks):
    out, (a, b) = ranks
    shared = os.path.join(out, "shared")
    assert a["shared"]["disk"] == b["shared"]["disk"] == shared
    assert not any(name.startswith("rank") for name in os.listdir(shared))
    blocks = [name.split("_")[1] for name in a["shared"]["final"]]  # block_<index>_g<generation>.bin
    assert blocks == [f"{i:05d}" for i in range(5)]  # one file per block (4 layers + the resident set)
    assert sorted(os.listdir(os.path.join(out, "own"))) == ["rank0", "rank1"]  # the other mode, for contrast


def test_shared_files_change_only_at_a_consolidation(ranks):
    _, (a, _) = ranks
    run = a["shared"]
    assert run["merged"] == [0, 0, 0, 0, 1]  # before step 3 (3 pending), then again in close()
    assert run["closed"] == 2
    for t in range(STEPS):
        before, after = run["snaps"][t], run["snaps"][t + 1]
        if run["merged"][t] == run["merged"][t + 1]:
            assert after == before, t
        else:
            assert after != before, t
        for name in before.keys() & after.keys():  # a file is never rewritten in place
            assert after[name] == before[name], name
    assert len(run["snaps"][0]) == len(run["final"])


def test_shared_disk_errors_name_the_fix(ranks):
    _, results = ranks
    for res in results:
        assert "disk_dir is None" in res["no_dir"] and "shared_disk" in res["no_dir"]
        assert "rank 1 has disk_dir" in res["other_dir"] and "same disk_dir" in res["other_dir"]
    with pytest.raises(ValueError, match="True or False"):
        DataParallel(shared_disk="yes")
    with pytest.raises(ValueError, match="from_store with DataParallel"):
        zo2tier.ZOEngine.from_store("nowhere", budget=BIG, data_parallel=DataParallel(shared_disk=True))
