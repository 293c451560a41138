"""The ``zo2tier`` command line: argparse -> dataclasses -> public API. No logic lives here."""

from __future__ import annotations

import argparse
import sys

from zo2tier.budget import TierBudget


def _storage_arg(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        tier, sep, dtype = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"storage entry {part!r} needs '=': write host=bf16,disk=int8")
        out[tier.strip()] = dtype.strip()
    return out


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
    plan.set_defaults(func=_cmd_plan)
    _add_store_commands(sub)
    return parser


def _add_store_commands(sub) -> None:
    conv = sub.add_parser("convert", help="stream a Hugging Face model (or a config.json) into a zo2tier store")
    conv.add_argument("src", help="HF model dir (safetensors, pytorch_model.bin, *.gguf), a .gguf file, or config.json")
    conv.add_argument("dst", help="the store directory to create (a re-run resumes it)")
    conv.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                      help="compute dtype of the model (default: the source's, lossless)")
    conv.add_argument("--disk-dtype", choices=("fp32", "fp16", "bf16", "int8"), default=None,
                      help="how decoder-layer blocks are stored (default: --dtype)")
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
                progress=not args.no_progress)
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
                        calibration=args.calibration))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"zo2tier {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
