"""Scaling report: the planner's placement and predicted step time for OPT-1.3B ... 1T, BLOOM-176B and
Llama-2-70B under several budget sets; writes the tables, the raw numbers and two plots.

    python tools/scaling_report.py                       # writes the three outputs below
    python tools/scaling_report.py --markdown-only       # print the tables, write nothing

Outputs: ``benchmarks/scaling_predictions.json`` (every number), ``docs/scaling_memory.png`` and
``docs/scaling_throughput.png``; the Markdown tables go to stdout (and, with ``--update-doc``, replace the
generated block of ``docs/scaling.md`` between the ``<!-- scaling_report:begin/end -->`` markers).

Everything is arithmetic over meta-device skeletons (``zo2tier.plan.plan_placement`` and
``zo2tier.predict.predict_step``): no weights, no GPU, a few seconds of CPU per model.

The planner's device bytes are the blocks, the resident set and the working buffers it sizes (upload slots,
θ±εz scratch of the largest layer part or resident module, write-back buffers). The engine also allocates
things the planner does not count (the CUDA context and what the allocator keeps, the full-vocabulary logits
of the doubled batch, the loss chunk, a layer part's activations). Their sum is estimated here by
``unplanned_device_bytes`` and taken off the card before planning, so that the placement is one the card can
hold; ``est_gpu_peak`` is the sum of both (see that function).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GB, GIB = 10**9, 2**30
BATCH, SEQ = 1, 2048
TOKENS = BATCH * SEQ
WRITE_BACKS = (1, 16)
STORAGES = ("fp16", "int8")  # host and disk storage; device blocks stay in the fp16 compute dtype

# Seed document (../shared/seeds/000_*.txt) projections for ZO2: GPU GB (table 1.2) and tok/s (table 2.2).
SEED_GPU_GB = {"OPT-1.3B": 2.6, "OPT-2.7B": 3.2, "OPT-6.7B": 4.5, "OPT-13B": 6.2, "OPT-30B": 8.5,
               "OPT-66B": 12.0, "OPT-175B": 18.0, "BLOOM-176B": 20.5, "1T (OPT-shaped)": 45.0}
SEED_TOKS = {"OPT-1.3B": 3072, "OPT-2.7B": 1920, "OPT-6.7B": 768, "OPT-13B": 384, "OPT-30B": 160,
             "OPT-66B": 64, "OPT-175B": 20}
# docs/design.md §1: ZO2's own CPU-offload mode measured on the H100 (tok/s, GPU GiB).
ZO2_MEASURED = {"OPT-6.7B": (5848, 4.70), "OPT-13B": (2890, 5.83), "OPT-30B": (1478, 7.72)}

# The GPU bytes the planner does not count: zo2tier.plan.unplanned_device_bytes (measured on the H100).


def _opt(h, layers, heads, vocab=50272):
    from transformers import OPTConfig

    return OPTConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=4 * h,
                     word_embed_proj_dim=h, vocab_size=vocab, max_position_embeddings=2048)


def model_configs():
    """(name, config) for every model in the report; configs are built here, nothing is downloaded."""
    from transformers import BloomConfig, LlamaConfig

    return [
        ("OPT-1.3B", _opt(2048, 24, 32)),
        ("OPT-2.7B", _opt(2560, 32, 32)),
        ("OPT-6.7B", _opt(4096, 32, 32)),
        ("OPT-13B", _opt(5120, 40, 40)),
        ("OPT-30B", _opt(7168, 48, 56)),
        ("OPT-66B", _opt(9216, 64, 72)),
        ("OPT-175B", _opt(12288, 96, 96)),
        ("1T (OPT-shaped)", _opt(25600, 128, 200)),
        ("BLOOM-176B", BloomConfig(hidden_size=14336, n_layer=70, n_head=112, vocab_size=250880)),
        ("Llama-2-70B", LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                    num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                                    max_position_embeddings=4096, tie_word_embeddings=False)),
    ]


def budget_sets():
    """name -> (card bytes, host bytes, disk bytes, Calibration, description)."""
    from zo2tier.predict import Calibration

    consumer_gpu = {"h2d_gbps": 25.0, "d2h_gbps": 25.0, "bus_both_gbps": 45.0, "forward_tflops": 150.0,
                    "fused_pass_gbps": 800.0}
    return {
        "consumer-1nvme": (24 * GIB, 56 * GB, 3600 * GB,
                           Calibration(disk_read_gbps=3.5, disk_write_gbps=3.0, **consumer_gpu),
                           ("24 GB GPU (RTX 4090-class), 64 GB RAM less 8 GB for the OS = 56 GB host, one 4 TB "
                            "NVMe at 3.5 GB/s read / 3.0 write")),
        "consumer-2nvme": (24 * GIB, 56 * GB, 7200 * GB,
                           Calibration(disk_read_gbps=7.0, disk_write_gbps=6.0, **consumer_gpu),
                           "as above with two NVMe striped: 7.0 GB/s read / 6.0 write"),
        "h100": (78 * GIB, 112 * GIB, 56 * GIB, Calibration(),
                 ("the H100 machine: 78 GiB usable of the 80 GB card, 128 GiB RAM less 16 GiB headroom, "
                  "56 GiB of its 64 GiB disk, docs/design.md §1 rates (disk 2.24 / 2.84 GB/s)")),
        "h100-large-nvme": (78 * GIB, 112 * GIB, 8000 * GB, Calibration(),
                            "the H100 machine with an 8 TB NVMe at its measured 2.24 / 2.84 GB/s"),
    }


def plan_input(config, storage):
    """PlanInput from a config: a meta-device skeleton in fp16, host and disk stored as ``storage``."""
    import torch
    from transformers import AutoModelForCausalLM

    from zo2tier.model.blocks import describe, scratch_spans
    from zo2tier.plan import DEFAULT_HOST_LOOKAHEAD, BlockSize, PlanInput

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    layout = describe(skeleton)
    sizes = tuple(BlockSize(n, sum(p.numel for p in layout.params_under(n))) for n in layout.block_names)
    resident = sum(p.numel for p in layout.params) - sum(s.numel for s in sizes)
    part, resident_module = scratch_spans(layout)
    return PlanInput(sizes, resident, 2, {"device": "fp16", "host": storage, "disk": storage},
                     DEFAULT_HOST_LOOKAHEAD, largest_part=part, largest_resident_module=resident_module)


MEASURED_PARAMS = {"opt-6.7b": 6.66e9, "opt-13b": 12.85e9, "opt-30b": 29.97e9}  # the benchmarked shapes, head tied


def unplanned_device_bytes(inp, vocab):
    """GPU bytes the planner does not count (``zo2tier.plan.unplanned_device_bytes``) for a batch-1 ×
    2048-token step on a ``vocab``-entry vocabulary."""
    import dataclasses

    from zo2tier.plan import unplanned_device_bytes as unplanned

    return unplanned(dataclasses.replace(inp, vocab_size=vocab), TOKENS)


def est_gpu_peak(inp, plan_used_device, vocab):
    """Planned device bytes + the unplanned bytes: an estimate of the NVML peak, not a measurement."""
    return plan_used_device + unplanned_device_bytes(inp, vocab)


def evaluate(name, config, bset, inp):
    from zo2tier.budget import TierBudget
    from zo2tier.plan import plan_placement
    from zo2tier.predict import predict_step

    card, host, disk, cal, _ = bset
    n_params = inp.resident_numel + sum(b.numel for b in inp.blocks)
    reserve = unplanned_device_bytes(inp, config.vocab_size)
    rec = {"model": name, "n_params": n_params, "n_blocks": len(inp.blocks),
           "block_numel_max": max(b.numel for b in inp.blocks), "resident_numel": inp.resident_numel,
           "storage": dict(inp.storage), "card_bytes": card, "unplanned_device_bytes": reserve,
           "budget": {"device": max(card - reserve, 0), "host": host, "disk": disk}}
    try:
        plan = plan_placement(inp, TierBudget(max(card - reserve, 0), host, disk))
    except ValueError as err:
        rec["fits"] = False
        rec["error"] = f"does not fit: {err}"
        return rec
    rec.update(fits=True, blocks=plan.counts(), used_bytes=dict(plan.used_bytes),
               working_bytes=plan.working_bytes,
               est_gpu_peak_bytes=est_gpu_peak(inp, plan.used_bytes["device"], config.vocab_size))
    rec["predictions"] = {}
    for k in WRITE_BACKS:
        p = predict_step(inp, plan, cal, tokens=TOKENS, write_back_every=k)
        rec["predictions"][str(k)] = {"compute_s": p.compute_s, "bus_s": p.bus_s, "disk_s": p.disk_s,
                                      "step_s": p.step_s, "tok_per_s": TOKENS / p.step_s, "bound": p.bound}
    return rec


def measured_checks():
    """The planner against benchmarks/step_h100.jsonl and capped_h100.jsonl: same model, budget, storage and
    write-back. Rates: the ones the run measured itself (raw disk read/write, bus) where its record has them,
    docs/design.md's otherwise; measured: the mean step where recorded (it carries the amortized write-backs)."""
    import dataclasses

    from _rates import measured_rates

    from zo2tier.budget import TierBudget
    from zo2tier.plan import plan_placement
    from zo2tier.predict import Calibration, predict_step

    shapes = {"opt-6.7b": _opt(4096, 32, 32), "opt-13b": _opt(5120, 40, 40), "opt-30b": _opt(7168, 48, 56)}
    rows = []
    for name in ("step_h100.jsonl", "capped_h100.jsonl"):
        with open(os.path.join(ROOT, "benchmarks", name), encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    out, cache = [], {}
    for r in rows:
        if r.get("model") not in shapes or r.get("batch") != 1 or r.get("seq") != 2048:
            continue
        if r["model"] not in cache:
            cache[r["model"]] = plan_input(shapes[r["model"]], "fp16")
        inp = dataclasses.replace(cache[r["model"]], storage=dict(r["storage"]))
        planned = plan_placement(inp, TierBudget.parse(r["budget"]))
        counts = r["blocks_per_tier"]  # predict the placement the run had (the planner has changed since some)
        tiers = ["device"] * counts["device"] + ["host"] * counts["host"] + ["disk"] * counts["disk"]
        plan = plan_placement(inp, TierBudget(10**15, 10**15, 10**15), dict(zip((b.name for b in inp.blocks), tiers)))
        k = r["write_back_every"] if r["phase"] == "train" else 10**12  # eval: read-only
        rates = measured_rates(r)
        p = predict_step(inp, plan, Calibration(**rates), tokens=TOKENS, write_back_every=k,
                         replays=0 if r["phase"] == "eval" else None)
        measured = r.get("step_s_mean", r["step_s"])
        out.append({"model": r["model"], "phase": r["phase"], "budget": r["budget"], "write_back_every": k,
                    "storage": r["storage"], "git_rev": r["git_rev"], "rates": "same run" if rates else "docs/design.md",
                    "ram_cap_gib": r.get("ram_cap_gib"),
                    "blocks_planned": planned.counts(), "blocks_measured": r["blocks_per_tier"],
                    "measured_step_s": measured, "measured_tok_per_s": TOKENS / measured,
                    "predicted_step_s": p.step_s, "predicted_bound": p.bound,
                    "predicted_over_measured": p.step_s / measured,
                    "planned_device_bytes": planned.used_bytes["device"],
                    "est_gpu_peak_bytes": est_gpu_peak(inp, plan.used_bytes["device"], 50272),
                    "gpu_peak_nvml_gib": r.get("gpu_peak_nvml_gib"), "gpu_peak_torch_gib": r.get("gpu_peak_torch_gib")})
    return out


def _g(n):
    """Bytes as GB (10**9), compact."""
    if n == 0:
        return "0"
    v = n / GB
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _params(n):
    return f"{n / 1e12:.2f}T" if n >= 1e12 else f"{n / 1e9:.1f}B"


def markdown(results, budgets, checks):
    lines = []
    for bname, (card, host, disk, cal, desc) in budgets.items():
        lines += [f"### Budget set `{bname}`", "",
                  (f"{desc}. Rates: bus {cal.h2d_gbps:g} / {cal.d2h_gbps:g} GB/s up / down "
                   f"({cal.bus_both_gbps:g} both), disk {cal.disk_read_gbps:g} / {cal.disk_write_gbps:g} GB/s "
                   f"read / write, compute {cal.forward_tflops:g} TFLOP/s, fused pass {cal.fused_pass_gbps:g} GB/s."),
                  "",
                  ("| model | params | host/disk storage | blocks GPU / host / disk | GPU GB (planned; est. peak) "
                   "| host GB | disk GB | step s, K=1 | tok/s, K=1 | bound | step s, K=16 | tok/s, K=16 | bound |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in results if r["budget_set"] == bname):
            head = f"| {r['model']} | {_params(r['n_params'])} | {r['storage']['host']} |"
            if not r["fits"]:
                msg = r["error"].replace("|", "/")
                lines.append(head + f" {msg} | | | | | | | | |")
                continue
            c, u = r["blocks"], r["used_bytes"]
            p1, p16 = r["predictions"]["1"], r["predictions"]["16"]
            warn = " ⚠" if r["est_gpu_peak_bytes"] > card else ""
            lines.append(
                head + f" {c['device']} / {c['host']} / {c['disk']} | {_g(u['device'])}; {_g(r['est_gpu_peak_bytes'])}{warn} "
                f"| {_g(u['host'])} | {_g(u['disk'])} | {p1['step_s']:.3g} | {p1['tok_per_s']:,.0f} | {p1['bound']} "
                f"| {p16['step_s']:.3g} | {p16['tok_per_s']:,.0f} | {p16['bound']} |")
        lines.append("")
    lines += ["### The planner against measurement (H100, `benchmarks/step_h100.jsonl`, `capped_h100.jsonl`)", "",
              ("Rates: the disk and bus rates the run measured itself where its record has them, docs/design.md's "
               "otherwise. Measured: the mean step where recorded (write-backs included), else the median."), "",
              ("| model | phase | budget | storage host/disk | K | rates | blocks planned (measured) "
               "| predicted step s (bound) | measured step s | predicted / measured | planned GPU GB; est. peak GiB "
               "| measured NVML GiB |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        bp, bm = c["blocks_planned"], c["blocks_measured"]
        k = "read-only" if c["phase"] == "eval" else c["write_back_every"]
        cap = f" (RAM cap {c['ram_cap_gib']} GiB)" if c.get("ram_cap_gib") else ""
        lines.append(
            f"| {c['model']}{cap} | {c['phase']} | `{c['budget']}` | {c['storage']['host']}/{c['storage']['disk']} "
            f"| {k} | {c['rates']} | {bp['device']}/{bp['host']}/{bp['disk']} "
            f"({bm['device']}/{bm['host']}/{bm['disk']}) | {c['predicted_step_s']:.3f} ({c['predicted_bound']}) "
            f"| {c['measured_step_s']:.3f} | {c['predicted_over_measured']:.2f} "
            f"| {_g(c['planned_device_bytes'])}; {c['est_gpu_peak_bytes'] / GIB:.1f} | {c['gpu_peak_nvml_gib']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def plots(results, checks, mem_png, tput_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = {r["model"]: r["n_params"] for r in results}

    # Memory per tier vs model size: consumer-2nvme, int8 storage (the set that holds the most models).
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for bname, storage, style in (("consumer-2nvme", "int8", "-"), ("h100-large-nvme", "fp16", "--")):
        rows = sorted((r for r in results if r["budget_set"] == bname and r["storage"]["host"] == storage
                       and r["fits"] and r["model"].startswith(("OPT", "1T"))), key=lambda r: r["n_params"])
        x = [r["n_params"] for r in rows]
        for tier, color in (("device", "C0"), ("host", "C1"), ("disk", "C2")):
            y = [r["used_bytes"][tier] / GB or float("nan") for r in rows]  # a tier left empty: no point
            ax.plot(x, y, style, color=color, marker="o", ms=3,
                    label=f"{tier} ({bname}, {storage} storage)")
        if bname == "consumer-2nvme":
            ax.plot(x, [r["est_gpu_peak_bytes"] / GB for r in rows], ":", color="C0", marker="^", ms=3,
                    label="GPU est. peak (consumer-2nvme, int8)")
    seed = [(sizes[m], v) for m, v in SEED_GPU_GB.items() if m in sizes]
    ax.plot(*zip(*sorted(seed)), "x-", color="C3", label="seed doc: projected ZO2 GPU GB")
    zo2 = [(sizes[m], g * GIB / GB) for m, (_, g) in ZO2_MEASURED.items()]
    ax.plot(*zip(*zo2), "s", color="C4", mfc="none", label="ZO2 measured GPU (docs/design.md §1)")
    meas = [(MEASURED_PARAMS[c["model"]], c["gpu_peak_nvml_gib"] * GIB / GB)
            for c in checks if c["phase"] == "train"]
    ax.plot(*zip(*meas), "*", color="k", ms=11, label="zo2tier measured GPU, NVML (H100)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(0.1, None)
    ax.set_xlabel("parameters")
    ax.set_ylabel("GB per tier (planner), log scale")
    ax.set_title("Memory per tier vs model size (OPT shapes, batch 1 x 2048)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(mem_png, dpi=110)
    plt.close(fig)

    # Predicted tok/s vs model size.
    fig, ax = plt.subplots(figsize=(8, 5.5))
    series = [("consumer-1nvme", "fp16", 1, "C0", "-"), ("consumer-1nvme", "int8", 16, "C0", "--"),
              ("consumer-2nvme", "int8", 16, "C1", "--"), ("h100-large-nvme", "fp16", 1, "C2", "-"),
              ("h100-large-nvme", "int8", 16, "C2", "--")]
    for i, (bname, storage, k, color, style) in enumerate(series):
        rows = sorted((r for r in results if r["budget_set"] == bname and r["storage"]["host"] == storage
                       and r["fits"] and r["model"].startswith(("OPT", "1T"))), key=lambda r: r["n_params"])
        ax.plot([r["n_params"] for r in rows], [r["predictions"][str(k)]["tok_per_s"] for r in rows], style,
                color=color, marker="ovsDo"[i], ms=4, mfc="none", label=f"predicted: {bname}, {storage}, K={k}")
    ax.plot(*zip(*sorted((sizes[m], v) for m, v in SEED_TOKS.items())), "x-", color="C3",
            label="seed doc: projected ZO2 tok/s")
    ax.plot(*zip(*[(sizes[m], t) for m, (t, _) in ZO2_MEASURED.items()]), "s", color="C4", mfc="none",
            label="ZO2 measured, H100 (docs/design.md §1)")
    for c in checks:
        if c["phase"] != "train":
            continue
        x = MEASURED_PARAMS[c["model"]]
        ax.plot([x], [c["measured_tok_per_s"]], "*", color="k" if c["write_back_every"] == 1 else "C5", ms=11,
                label=f"zo2tier measured H100 (host or disk tier), K={'1' if c['write_back_every'] == 1 else '>1'}")
        ax.plot([x * 1.04], [TOKENS / c["predicted_step_s"]], "P", color="k", mfc="none", ms=8,
                label="planner's prediction for the measured run (same budget)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("tokens / s (batch 1 x 2048), log scale")
    ax.set_title("Throughput vs model size: planner predictions, measurements, seed projections")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(tput_png, dpi=110)
    plt.close(fig)


BEGIN, END = "<!-- scaling_report:begin -->", "<!-- scaling_report:end -->"


def update_doc(path, text):
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN not in doc:
        raise SystemExit(f"{path} has no {BEGIN} marker; add the markers where the tables go")
    doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.DOTALL)
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "scaling_predictions.json"))
    ap.add_argument("--memory-png", default=os.path.join(ROOT, "docs", "scaling_memory.png"))
    ap.add_argument("--throughput-png", default=os.path.join(ROOT, "docs", "scaling_throughput.png"))
    ap.add_argument("--update-doc", default=None, help="replace the generated block of this Markdown file")
    ap.add_argument("--markdown-only", action="store_true")
    a = ap.parse_args(argv)

    budgets = budget_sets()
    results = []
    for name, config in model_configs():
        fp16 = plan_input(config, "fp16")  # one skeleton per model; storage only changes the byte counts
        for storage in STORAGES:
            inp = dataclasses.replace(fp16, storage={"device": "fp16", "host": storage, "disk": storage})
            for bname, bset in budgets.items():
                rec = evaluate(name, config, bset, inp)
                rec["budget_set"] = bname
                results.append(rec)
    from zo2tier import plan as plan_mod

    checks = measured_checks()
    text = markdown(results, budgets, checks)
    print(text)
    if a.markdown_only:
        return 0
    raw = {"batch": BATCH, "seq": SEQ, "write_back_every": list(WRITE_BACKS), "bytes_unit": "bytes",
           "budget_sets": {k: {"card_bytes": v[0], "host_bytes": v[1], "disk_bytes": v[2],
                               "calibration": vars(v[3]), "description": v[4]} for k, v in budgets.items()},
           "unplanned_model": {"context_bytes": plan_mod.CUDA_CONTEXT_BYTES, "logit_bytes": plan_mod.LOGIT_BYTES,
                               "loss_chunk_bytes_per_vocab": plan_mod.LOSS_CHUNK_BYTES_PER_VOCAB,
                               "part_bytes_per_param": plan_mod.PART_ACTIVATION_BYTES},
           "seed_projection": {"gpu_gb": SEED_GPU_GB, "tok_per_s": SEED_TOKS},
           "results": results, "measured_checks": checks}
    with open(a.json, "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=1)
    plots(results, checks, a.memory_png, a.throughput_png)
    if a.update_doc:
        update_doc(a.update_doc, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
