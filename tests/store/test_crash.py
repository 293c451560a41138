"""SIGKILL a tiered fine-tune at random moments; each resume must end bit-identical to a clean run."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import signal
import time

import pytest
import torch
from tiny_models import tiny_model

import zo2tier

N_STEPS = 5
N_TRIALS = 10
FAULT_DELAY_S = 0.02  # widens the write window (between fsync and rename) so kills land inside writes


@pytest.fixture(scope="module")
def ctx():
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "zo2tier", "tiny_models", "crash_worker"])
    return context


def _run(ctx, *args) -> mp.Process:
    import crash_worker

    p = ctx.Process(target=crash_worker.run, args=args)
    p.start()
    return p


def _writing(store: str) -> bool:
    return any(f.endswith(".tmp") for f in os.listdir(store))


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path, ctx):
    tiny_model("llama").save_pretrained(tmp_path / "hf")
    pristine = str(tmp_path / "pristine")
    zo2tier.convert(tmp_path / "hf", pristine, progress=False)

    warm = ctx.Process(target=time.sleep, args=(0,))  # start the forkserver (imports torch once) untimed
    warm.start()
    warm.join()
    ref_store, ref_out = str(tmp_path / "ref"), str(tmp_path / "ref.pt")
    shutil.copytree(pristine, ref_store)
    t0 = time.perf_counter()
    p = _run(ctx, ref_store, str(tmp_path / "ref_ck"), N_STEPS, ref_out, FAULT_DELAY_S)
    p.join()
    run_s = time.perf_counter() - t0
    assert p.exitcode == 0
    ref = torch.load(ref_out)

    rng = random.Random(0)
    mid_write = kills = 0
    for trial in range(3 * N_TRIALS):
        if kills == N_TRIALS:
            break
        store, ckpt, out = (str(tmp_path / f"t{trial}_{x}") for x in ("store", "ck", "out.pt"))
        shutil.copytree(pristine, store)
        p = _run(ctx, store, ckpt, N_STEPS, out, FAULT_DELAY_S)
        time.sleep(rng.uniform(0.1, 0.9) * run_s)
        if trial % 2:  # every other kill lands inside a block write: wait for its .tmp file
            deadline = time.perf_counter() + run_s
            while p.exitcode is None and time.perf_counter() < deadline and not _writing(store):
                time.sleep(0.001)
        if p.exitcode is None:
            os.kill(p.pid, signal.SIGKILL)
        p.join()
        kills += p.exitcode == -signal.SIGKILL
        mid_write += _writing(store)
        p = _run(ctx, store, ckpt, N_STEPS, out, 0.0)
        p.join()
        assert p.exitcode == 0, f"trial {trial}: the resumed run failed"
        got = torch.load(out)
        assert got["losses"] == ref["losses"], f"trial {trial}: losses differ after resume"
        for key, value in ref["state"].items():
            assert torch.equal(value, got["state"][key]), f"trial {trial}: {key} differs after resume"
        shutil.rmtree(store)
    print(f"{kills} kills ({run_s:.2f} s per clean run), {mid_write} inside a block write")
    assert kills == N_TRIALS
    assert mid_write >= N_TRIALS // 3
