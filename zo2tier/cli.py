"""The ``zo2tier`` command line: argparse -> dataclasses -> public API. No logic lives here."""

from __future__ import annotations

import argparse
import sys

from zo2tier.budget import TierBudget
from zo2tier.store.io import BlockIOError
from zo2tier.store.lock import StoreLockedError


def _storage_arg(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        tier, sep, dtype = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"storage entry {part!r} needs '=': write host=bf16,disk=int8")
        out[tier.strip()] = dtype.strip()
    return out


def _compress_arg(text: str):
    from zo2tier.store.zstd import parse_compress

    try:
        return parse_compress(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _budget_arg(text: str) -> TierBudget:
    try:
        return TierBudget.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zo2tier", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="print the placement for given budgets, without loading weights")
    plan.add_argument("model", help="a Hugging Face model directory, or a config.json file")
    plan.add_argument("--budget", type=_budget_arg, required=True,
                      help="bytes per tier, e.g. device=8GiB,host=16GiB,disk=100GiB")
    plan.add_argument("--storage", type=_storage_arg, default={},
                      help="stored dtype per tier, e.g. host=bf16,disk=int8 (default: the model's dtype)")
    plan.add_argument("--dtype", default=None, help="compute dtype: fp32, fp16 or bf16 (default: the config's)")
    plan.add_argument("--calibration", default=None, help="a calibration JSON from tools/bench_io.py")
    plan.add_argument("--batch", type=int, default=1, help="sequences per step, for the predicted step time")
    plan.add_argument("--seq", type=int, default=2048, help="tokens per sequence, for the predicted step time")
    plan.add_argument("--write-back-every", type=int, default=1, help="steps between write-backs (K)")
    plan.add_argument("--compress", type=_compress_arg, default=None, metavar="{zstd,none}",
                      help="zstd on the disk tier: the prediction counts the ratio and the zstd GB/s of "
                           "--calibration (default none; docs/io.md)")
    plan.set_defaults(func=_cmd_plan)
    _add_store_commands(sub)
    _add_finetune(sub)
    return parser


def _add_finetune(sub) -> None:
    ft = sub.add_parser("finetune", help="fine-tune on a labelled CSV/JSONL with tiered MeZO; prints accuracies",
                        description="Zero-shot accuracy, MeZO fine-tune, fine-tuned accuracy. The last stdout "
                                    "line is a JSON object (zero_shot_acc, finetuned_acc, steps, seconds, ...).")
    ft.add_argument("--model", required=True, help="a Hugging Face model directory or a .gguf file")
    ft.add_argument("--train", required=True, help="training data: .csv (with a header) or .jsonl")
    ft.add_argument("--test", required=True, help="held-out data for the zero-shot and final accuracy")
    ft.add_argument("--dev", default=None, help="data for the --eval-every curve (default: --test)")
    ft.add_argument("--text-column", default="text")
    ft.add_argument("--label-column", default="label")
    ft.add_argument("--encoding", default="utf-8", help="text encoding of the data files, e.g. latin-1")
    ft.add_argument("--template", default="{text} It was", help="prompt with a {text} slot")
    ft.add_argument("--label-words", default="positive=great,negative=terrible",
                    help="label=word pairs; the model is scored on ' word' after the prompt")
    ft.add_argument("--objective", choices=("lm", "classification"), default="lm",
                    help="lm: LM loss on the label word; classification: cross-entropy over the label words")
    ft.add_argument("--steps", type=int, default=1000)
    ft.add_argument("--batch-size", type=int, default=16)
    ft.add_argument("--lr", type=float, default=1e-6)
    ft.add_argument("--eps", type=float, default=1e-3)
    ft.add_argument("--weight-decay", type=float, default=0.0)
    ft.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default="constant")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only before/after)")
    ft.add_argument("--eval-max", type=int, default=0, help="examples per --eval-every evaluation (0: all)")
    ft.add_argument("--eval-test", action="store_true",
                    help="with --dev: also log test accuracy at every eval point (for the curves only)")
    ft.add_argument("--max-length", type=int, default=64, help="tokens per example; long texts lose their start")
    ft.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:1")
    ft.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                    help="compute dtype (default: the checkpoint's)")
    ft.add_argument("--budget", type=_budget_arg, required=True,
                    help="bytes per tier, e.g. device=2GiB,host=4GiB,disk=20GiB")
    ft.add_argument("--disk-dir", default=None, help="folder for disk-tier blocks")
    ft.add_argument("--storage", type=_storage_arg, default={}, help="stored dtype per tier, e.g. host=bf16,disk=int8")
    ft.add_argument("--write-back-every", type=int, default=1, help="write host/disk blocks back every K visits")
    ft.add_argument("--compress", choices=("none", "zstd"), default=None,
                    help="store disk-tier blocks as zstd frames (default: off; docs/io.md says when it pays)")
    ft.add_argument("--out", required=True, help="folder for log.jsonl, checkpoint.json, curves.png, model/")
    ft.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    ft.add_argument("--export", choices=("hf", "none"), default="hf",
                    help="hf: write the final weights to OUT/model as a Hugging Face directory")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from zo2tier.train.job import finetune, main_result_line

    result = finetune(
        model=args.model, train=args.train, test=args.test, dev=args.dev, out=args.out,
        text_column=args.text_column, label_column=args.label_column, encoding=args.encoding,
        template=args.template, label_words=args.label_words, objective=args.objective,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, eps=args.eps, weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule, seed=args.seed, eval_every=args.eval_every, eval_max=args.eval_max,
        eval_test=args.eval_test, max_length=args.max_length, device=args.device, dtype=args.dtype, budget=args.budget,
        disk_dir=args.disk_dir, storage=args.storage, write_back_every=args.write_back_every, compress=args.compress,
        resume=args.resume, export=args.export, progress=not args.no_progress,
    )
    print(main_result_line(result), flush=True)
    return 0


def _add_store_commands(sub) -> None:
    conv = sub.add_parser("convert", help="stream a Hugging Face model (or a config.json) into a zo2tier store")
    conv.add_argument("src", help="HF model dir (safetensors, pytorch_model.bin, *.gguf), a .gguf file, or config.json")
    conv.add_argument("dst", help="the store directory to create (a re-run resumes it)")
    conv.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                      help="compute dtype of the model (default: the source's, lossless)")
    conv.add_argument("--disk-dtype", choices=("fp32", "fp16", "bf16", "int8"), default=None,
                      help="how decoder-layer blocks are stored (default: --dtype)")
    conv.add_argument("--compress", type=_compress_arg, default=None, metavar="{zstd,none}",
                      help="store decoder-layer blocks as zstd frames (default none; docs/io.md)")
    conv.add_argument("--seed", type=int, default=0, help="seed of the random init when SRC is a config")
    conv.add_argument("--no-progress", action="store_true", help="no progress bar")
    conv.set_defaults(func=_cmd_convert)
    exp = sub.add_parser("export", help="write a store as a Hugging Face safetensors model, updates applied")
    exp.add_argument("store", help="a zo2tier store directory")
    exp.add_argument("out_dir", help="an empty or new directory")
    exp.add_argument("--max-shard-size", type=_size_arg, default=5 << 30, help="bytes per shard file, e.g. 5GB")
    exp.set_defaults(func=_cmd_export)


def _size_arg(text: str) -> int:
    from zo2tier.budget import parse_size

    try:
        return parse_size(text, what="--max-shard-size")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_convert(args: argparse.Namespace) -> int:
    from zo2tier.store.convert import convert

    r = convert(args.src, args.dst, dtype=args.dtype, disk_dtype=args.disk_dtype, seed=args.seed,
                progress=not args.no_progress, compress=args.compress)
    print(f"{r.store}: {r.n_blocks} blocks ({r.n_written} written), {r.source_bytes / 1e9:.2f} GB read, "
          f"{r.store_bytes / 1e9:.2f} GB stored, {r.seconds:.1f} s ({r.source_bytes / 1e9 / max(r.seconds, 1e-9):.2f} GB/s)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from zo2tier.store.export import export_store

    print(export_store(args.store, args.out_dir, max_shard_bytes=args.max_shard_size))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from zo2tier.planning import describe_plan

    print(describe_plan(args.model, args.budget, storage=args.storage, dtype=args.dtype,
                        calibration=args.calibration, batch=args.batch, seq=args.seq,
                        write_back_every=args.write_back_every, compress=args.compress))
    return 0


def main(argv: list[str] | None = None) -> int:
    from zo2tier.config import set_cuda_allocator_default

    set_cuda_allocator_default()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"zo2tier {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (BlockIOError, StoreLockedError) as exc:  # disk full, failing drive, store in use
        print(f"zo2tier {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
