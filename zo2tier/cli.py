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
    return parser


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
