"""One planner: `zo2tier plan` prints the placement ZOEngine.from_pretrained makes with the same inputs."""

import random
import subprocess
import sys

import pytest
from tiny_task import save_tiny_model

from zo2tier import TierBudget, ZOEngine
from zo2tier.planning import plan_for_model


def _plan_cli(model, budget, *extra):
    done = subprocess.run([sys.executable, "-m", "zo2tier", "plan", model, "--budget", budget, *extra],
                          capture_output=True, check=False, text=True, timeout=120)
    return done


def _runs(placement, names):
    """'device 0-1, host 2, disk 3'-style text of a placement, as `zo2tier plan` prints it."""
    from zo2tier.plan import Plan
    from zo2tier.planning import placement_line

    return placement_line(Plan(placement, {}, None, 0), names).removeprefix("placement: ")


def _deep_model(path):
    """A tiny Llama with 12 layers: enough that a device budget can hold some layers and not others."""
    import torch
    import transformers as tf
    from tiny_models import _COMMON

    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(**{**_COMMON, "num_hidden_layers": 12})).save_pretrained(path)
    return path


def test_plan_and_engine_place_alike_over_random_budgets(tmp_path):
    model = _deep_model(str(tmp_path / "m"))
    _base, inp, _ = plan_for_model(model, TierBudget.parse("device=1GiB"))
    names = [b.name for b in inp.blocks]
    block = max(b.numel for b in inp.blocks) * inp.compute_bytes
    from zo2tier.plan import block_bytes, working_bytes

    # device bytes before its first block once the layers are split over tiers: resident set and buffers
    floor = block_bytes(inp.resident_numel, inp.storage["device"]) + working_bytes(inp, len(names), len(names))
    rng = random.Random(0)
    agreed = 0
    seen = set()
    for i in range(40):
        dev = floor + rng.randint(-block // 2, len(names) * block)
        host = rng.randint(0, len(names) * block)
        budget = f"device={max(dev, 0)},host={host},disk={10 * len(names) * block}"
        try:
            plan = plan_for_model(model, TierBudget.parse(budget))[0]
        except ValueError as exc:
            plan, why = None, str(exc)
        try:
            with ZOEngine.from_pretrained(model, budget=budget, disk_dir=tmp_path / f"d{i}") as engine:
                placed = dict(engine.placement)
        except ValueError as exc:
            assert plan is None, f"{budget}: plan placed it but the engine refused: {exc}"
            assert str(exc) == why
            continue
        assert plan is not None, f"{budget}: the engine placed it but plan refused: {why}"
        assert plan.placement == placed, budget
        seen.add(tuple(plan.counts().values()))
        agreed += 1
    assert agreed >= 20 and len(seen) >= 5  # many budgets, many different placements
    # the CLI prints the same placement as the engine (one case, a subprocess)
    done = _plan_cli(model, budget)
    assert done.returncode == 0, done.stderr
    assert f"placement: {_runs(placed, names)}" in done.stdout


def test_plan_takes_every_model_kind_and_device(tmp_path):
    from zo2tier.store.convert import convert

    model = save_tiny_model(str(tmp_path / "m"))
    convert(model, tmp_path / "store", progress=False)
    for given, device in ((model, "cuda"), (str(tmp_path / "store"), "cpu"), (str(tmp_path / "m/config.json"), "cpu")):
        done = _plan_cli(given, "device=1GiB,host=1GiB,disk=1GiB", "--device", device)
        assert done.returncode == 0, done.stderr
        assert "placement: device 0-3" in done.stdout
        # a CPU step is not predicted from a GPU machine's rates
        assert ("predicted step: none for --device cpu" in done.stdout) == (device == "cpu")
        assert ("bound by" in done.stdout) == (device == "cuda")


def test_plan_of_a_broken_gguf_is_one_line(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf")
    done = _plan_cli(str(bad), "device=1GiB")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and str(bad) in done.stderr, done.stderr


@pytest.mark.parametrize("given", ["missing", "file.txt"])
def test_plan_of_a_non_model_names_it(tmp_path, given):
    (tmp_path / "file.txt").write_text("x")
    done = _plan_cli(str(tmp_path / given), "device=1GiB")
    assert done.returncode == 2 and "Traceback" not in done.stderr and given in done.stderr


def test_a_cpu_plan_counts_no_cuda_context_so_auto_keeps_fzoos_q(tmp_path, capsys):
    """On the CPU the device tier holds no CUDA context: a 1 GiB device budget leaves FZOO's auto at its
    steady q (it fell to 2 when 1.3 GiB of CUDA context was charged to the CPU); a CUDA plan still counts it,
    and the engine plans as `zo2tier plan` does."""
    from zo2tier import cli
    from zo2tier.plan import CUDA_CONTEXT_BYTES

    model = _deep_model(str(tmp_path / "m"))
    budget = TierBudget.parse("device=1GiB,host=0,disk=1GiB")
    assert plan_for_model(model, budget)[1].context_bytes == 0
    assert plan_for_model(model, budget, device="cuda")[1].context_bytes == CUDA_CONTEXT_BYTES
    with ZOEngine.from_pretrained(model, budget="device=1GiB", disk_dir=tmp_path / "d") as engine:
        assert engine.plan_input.context_bytes == 0
    args = ["plan", model, "--budget", "device=1GiB,host=0,disk=1GiB", "--estimator", "fzoo", "--perturbations",
            "auto", "--batch", "8", "--seq", "64"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "auto chose q=8 for fzoo" in out and "estimated device-tier (CPU) peak" in out
    assert cli.main([*args, "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "auto chose q=2 for fzoo (stopped by memory" in out and "estimated GPU peak" in out


def test_a_short_device_budget_names_the_floor_that_fits_any_split(tmp_path):
    """The shortfall of one placement is not enough to act on (host blocks need upload buffers on the device,
    so adding host room raises the need): the error also names the device budget that holds any split."""
    import re

    model = _deep_model(str(tmp_path / "m"))
    floors = set()
    for host in ("0", "1MiB", "1GiB"):
        with pytest.raises(ValueError, match="raise the device budget") as err:
            plan_for_model(model, TierBudget.parse(f"device=1B,host={host},disk=1GiB"))
        floors.add(int(re.search(r"at least [\d.]+ \w+ = (\d+) bytes holds", str(err.value)).group(1)))
    (floor,) = floors  # one number whatever the lower tiers' budgets
    for host in ("0", "1MiB", "1GiB"):
        plan_for_model(model, TierBudget.parse(f"device={floor}B,host={host},disk=1GiB"))
