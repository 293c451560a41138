"""The ``zo2tier`` command line: argparse -> dataclasses -> public API. No logic lives here."""

from __future__ import annotations

import argparse
import re
import sys

from zo2tier.budget import TierBudget
from zo2tier.store.io import BlockIOError
from zo2tier.store.lock import StoreLockedError
from zo2tier.train.schedule import SCHEDULES
from zo2tier.zo.estimators import ESTIMATORS


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


def _perturbations_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--perturbations {text!r} must be an int >= 1 or auto")
    return value


def _budget_arg(text: str) -> TierBudget:
    try:
        return TierBudget.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


DESCRIPTION = """Fine-tune language models larger than your GPU and RAM with zeroth-order MeZO-SGD: the model's
layers are spread over GPU memory, host RAM and disk, and streamed through the GPU one layer at a time.

The usual path:
  zo2tier convert MODEL STORE            once: a Hugging Face folder or .gguf -> a store on disk
  zo2tier plan STORE --budget ...        where each layer would go, and the predicted step time
  zo2tier finetune --model STORE ...     fine-tune on a labelled CSV; the store is left unchanged
  zo2tier generate --model OUT/model ... try prompts through the same tiers
MODEL is accepted as a store, a Hugging Face folder or a .gguf file everywhere. Run
`zo2tier COMMAND --help` for a command's flags; the README walks through an example."""
MODEL_HELP = "a zo2tier store, a Hugging Face folder or a .gguf file"


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's help shows its default; descriptions keep their line breaks."""


def build_parser() -> argparse.ArgumentParser:
    from zo2tier import __version__

    parser = argparse.ArgumentParser(prog="zo2tier", description=DESCRIPTION, formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"zo2tier {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = sub.add_parser("plan", formatter_class=_Help,
                          help="print where each layer goes for given budgets, without loading weights",
                          description="The placement ZOEngine makes with the same inputs (blocks per tier, "
                                      "bytes), and the predicted step time. Reads no weights.")
    plan.add_argument("model", help=MODEL_HELP + ", or a config.json")
    plan.add_argument("--budget", type=_budget_arg, required=True,
                      help="bytes per tier, e.g. device=8GiB,host=16GiB,disk=100GiB")
    plan.add_argument("--device", default="cpu", help="compute device the run would use: cpu or cuda")
    plan.add_argument("--storage", type=_storage_arg, default={},
                      help="stored dtype per tier, e.g. host=bf16,disk=int8 (empty: the model's dtype)")
    plan.add_argument("--dtype", default=None, help="compute dtype: fp32, fp16 or bf16 (None: the model's)")
    plan.add_argument("--calibration", default=None, help="a calibration JSON from tools/bench_io.py")
    plan.add_argument("--batch", type=int, default=1, help="sequences per step, for the predicted step time")
    plan.add_argument("--estimator", choices=tuple(sorted(ESTIMATORS)), default="mezo",
                      help="the step's estimator (docs/estimators.md)")
    plan.add_argument("--perturbations", type=_perturbations_arg, default=None, metavar="N|auto",
                      help="perturbations per step (None: the estimator's, as finetune); auto prints the q "
                           "the engine would choose")
    plan.add_argument("--seq", type=int, default=2048, help="tokens per sequence, for the predicted step time")
    plan.add_argument("--write-back-every", type=int, default=None,
                      help="steps between write-backs (K; None: the engine's default for --device)")
    plan.add_argument("--compress", type=_compress_arg, default=None, metavar="{zstd,none}",
                      help="zstd on the disk tier: the prediction counts the ratio and the zstd GB/s of "
                           "--calibration (None: as the engine would, zstd for a store converted with it)")
    plan.set_defaults(func=_cmd_plan)
    _add_store_commands(sub)
    _add_finetune(sub)
    _add_generate(sub)
    return parser


def _glue_negative_numbers(argv: list[str]) -> list[str]:
    """``--lr -1e-3`` as ``--lr=-1e-3``: argparse reads "-1e-3" as an option (it knows only -1 and -0.5)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.fullmatch(r"-\d*\.?\d+[eE][-+]?\d+", arg):
            out[-1] += "=" + arg
        else:
            out.append(arg)
    return out


def _add_finetune(sub) -> None:
    ft = sub.add_parser("finetune", formatter_class=_Help,
                        help="fine-tune on a labelled CSV/JSONL with tiered MeZO; prints accuracies",
                        description="Zero-shot accuracy, MeZO fine-tune, fine-tuned accuracy, then the weights "
                                    "exported to OUT/model. The last stdout line is a JSON object "
                                    "(zero_shot_acc, finetuned_acc, steps, seconds, ...). A store given as "
                                    "--model is left unchanged unless --in-place.")
    ft.add_argument("--model", required=True, help=MODEL_HELP)
    ft.add_argument("--train", required=True, help="training data: .csv (with a header) or .jsonl")
    ft.add_argument("--test", required=True, help="held-out data for the zero-shot and final accuracy")
    ft.add_argument("--dev", default=None,
                    help="held-out data that picks the kept weights (--keep best) and draws the --eval-every curve "
                         "(without it the curve is on --test and the last step's weights are kept)")
    ft.add_argument("--text-column", default="text", help="column holding the text")
    ft.add_argument("--label-column", default="label", help="column holding the label")
    ft.add_argument("--encoding", default="utf-8", help="text encoding of the data files, e.g. latin-1")
    ft.add_argument("--template", default="{text} It was", help="prompt with a {text} slot")
    ft.add_argument("--label-words", default="positive=great,negative=terrible",
                    help="label=word pairs; the model is scored on ' word' after the prompt")
    ft.add_argument("--objective", choices=("lm", "classification"), default="lm",
                    help="lm: LM loss on the label word; classification: cross-entropy over the label words")
    ft.add_argument("--steps", type=int, default=1000, help="MeZO steps (>= 1)")
    ft.add_argument("--batch-size", type=int, default=16, help="examples per step")
    ft.add_argument("--lr", type=float, default=None,
                    help="learning rate (None: the estimator's, mezo 1e-6, fzoo and fzoo-ema 3e-4)")
    ft.add_argument("--eps", type=float, default=1e-3, help="perturbation size")
    ft.add_argument("--estimator", choices=tuple(sorted(ESTIMATORS)), default="mezo",
                    help="how a step estimates: mezo (two-sided, MeZO-SGD at q=1), fzoo (one-sided, q >= 2, step "
                         "normalised by the losses' spread), fzoo-ema (the spread averaged over steps); "
                         "docs/estimators.md")
    ft.add_argument("--perturbations", type=_perturbations_arg, default=None, metavar="N|auto",
                    help="perturbations per step, evaluated while each block is resident (None: the "
                         "estimator's, mezo and fzoo-ema 1, fzoo 8; auto: as many as hide under the transfers, "
                         "never fewer than that default unless device memory forces it)")
    ft.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (not on biases and norms)")
    ft.add_argument("--lr-schedule", choices=SCHEDULES, default="constant",
                    help="learning-rate schedule over --steps")
    ft.add_argument("--seed", type=int, default=0, help="seed of z and of the batch order")
    ft.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only before/after)")
    ft.add_argument("--keep", choices=("best", "last"), default="best",
                    help="with --dev: best keeps the weights of the best dev evaluation (before training, every "
                         "--eval-every steps, after the last step), undoing the steps after it; last keeps the "
                         "last step's")
    ft.add_argument("--eval-max", type=int, default=0,
                    help="examples per --eval-every evaluation (0: all; fewer: --keep best selects only among the "
                         "whole-dev evaluations before and after training)")
    ft.add_argument("--eval-test", action="store_true",
                    help="with --dev: also log test accuracy at every eval point (for the curves only)")
    ft.add_argument("--max-length", type=int, default=64, help="tokens per example; long texts lose their start")
    ft.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:1")
    ft.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                    help="compute dtype (default: the checkpoint's)")
    ft.add_argument("--budget", type=_budget_arg, required=True,
                    help="bytes per tier, e.g. device=2GiB,host=4GiB,disk=20GiB")
    ft.add_argument("--disk-dir", default=None, help="folder for disk-tier blocks (None: OUT/disk)")
    ft.add_argument("--in-place", action="store_true",
                    help="with a store as --model: change the store itself instead of writing changed blocks "
                         "to --disk-dir (no other run may use the store meanwhile)")
    ft.add_argument("--storage", type=_storage_arg, default={},
                    help="stored dtype per tier, e.g. host=bf16,disk=int8 (empty: the model's dtype)")
    ft.add_argument("--write-back-every", type=int, default=None,
                    help="write host/disk blocks back every K steps (None: the engine's measured default, "
                         "e.g. host 4 / disk 16 on CUDA; docs/io.md)")
    ft.add_argument("--compress", choices=("none", "zstd"), default=None,
                    help="store disk-tier blocks as zstd frames (default: off; docs/io.md says when it pays)")
    ft.add_argument("--out", required=True, help="folder for log.jsonl, checkpoint/, curves.png, model/")
    ft.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    ft.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in --out")
    ft.add_argument("--export", choices=("hf", "none"), default="hf",
                    help="hf: write the final weights to OUT/model as a Hugging Face directory")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from zo2tier.train.job import finetune, main_result_line

    check_run_device(args.device)
    result = finetune(
        model=args.model, train=args.train, test=args.test, dev=args.dev, out=args.out,
        text_column=args.text_column, label_column=args.label_column, encoding=args.encoding,
        template=args.template, label_words=args.label_words, objective=args.objective,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, eps=args.eps, weight_decay=args.weight_decay,
        estimator=args.estimator, perturbations=args.perturbations,
        lr_schedule=args.lr_schedule, seed=args.seed, eval_every=args.eval_every, eval_max=args.eval_max,
        eval_test=args.eval_test, max_length=args.max_length, device=args.device, dtype=args.dtype, budget=args.budget,
        disk_dir=args.disk_dir, storage=args.storage, write_back_every=args.write_back_every, compress=args.compress,
        resume=args.resume, overwrite=args.overwrite, in_place=args.in_place, export=args.export, keep=args.keep,
        progress=not args.no_progress,
    )
    print(main_result_line(result), flush=True)
    return 0


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", formatter_class=_Help, help="generate text through the tiers",
                         description="Continue each prompt, the model streamed through the tiers as in training "
                                     "(batched, KV cache on the compute device). Prints one JSON line per prompt: "
                                     '{"prompt": ..., "text": the continuation, "tokens": its token ids}.')
    gen.add_argument("--model", required=True, help=MODEL_HELP)
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    gen.add_argument("--prompts-file", default=None, help="a UTF-8 text file, one prompt per line")
    gen.add_argument("--max-new-tokens", type=int, required=True, help="tokens to generate per prompt")
    how = gen.add_mutually_exclusive_group()
    how.add_argument("--greedy", action="store_true", help="pick the most likely token (the default)")
    how.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (0: greedy)")
    gen.add_argument("--seed", type=int, default=0, help="seed for sampling")
    gen.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    gen.add_argument("--kv-cache", choices=("auto", "device", "host"), default="auto",
                     help="where the KV cache lives: the compute device, host RAM (layer by layer up to the GPU), "
                          "or auto: the device if it fits in its free memory")
    gen.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:1")
    gen.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                     help="compute dtype (None: the model's)")
    gen.add_argument("--budget", type=_budget_arg, required=True,
                     help="bytes per tier, e.g. device=2GiB,host=4GiB,disk=20GiB")
    gen.add_argument("--disk-dir", default=None,
                     help="folder for the disk tier (None: a temporary folder, removed at exit; a store's "
                          "blocks are read where they are, never copied)")
    gen.add_argument("--storage", type=_storage_arg, default={},
                     help="stored dtype per tier, e.g. host=bf16,disk=int8 (empty: the model's dtype)")
    gen.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    import json
    import tempfile

    import torch

    from zo2tier.engine import ZOEngine
    from zo2tier.generate import generate_text
    from zo2tier.model_ref import model_ref

    check_run_device(args.device)
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except UnicodeDecodeError:
            raise ValueError(f"--prompts-file {args.prompts_file!r} is not UTF-8 text; save it as UTF-8") from None
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    ref = model_ref(args.model)
    tokenizer = ref.tokenizer()
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    with tempfile.TemporaryDirectory(prefix="zo2tier-generate-") as scratch:
        # a store is read where it is (shared with other readers); the disk tier's own store holds no copies
        engine = ZOEngine.from_pretrained(ref.gguf or ref.path, budget=args.budget, device=args.device,
                                          disk_dir=args.disk_dir or scratch, storage=args.storage or None,
                                          dtype=dtypes[args.dtype] if args.dtype else None)
        try:
            for g in generate_text(engine, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
                                   kv_cache=args.kv_cache):
                print(json.dumps(g.to_json(), ensure_ascii=False), flush=True)
        finally:
            engine.close()
    return 0


def check_run_device(text: str) -> None:
    """Raise ValueError unless ``--device`` can run here: cuda needs a CUDA build of torch and a visible GPU."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {text!r} is unknown; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {text!r}: {why} (torch {torch.__version__}); use --device cpu, or install a "
                         "CUDA build of torch on a machine with a GPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r} is not supported; use cpu, cuda or cuda:N")


def _add_store_commands(sub) -> None:
    conv = sub.add_parser("convert", formatter_class=_Help,
                          help="stream a model into a zo2tier store (once; then fine-tune it many times)",
                          description="Streams the weights one tensor at a time (peak RAM near the largest "
                                      "tensor) and copies the tokenizer, generation config and chat template, "
                                      "so the store is a complete model.")
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
    exp = sub.add_parser("export", formatter_class=_Help,
                         help="write a model as a Hugging Face folder (sharded safetensors, tokenizer), streamed",
                         description="Every pending update applied; the folder loads with "
                                     "AutoModelForCausalLM/AutoTokenizer.from_pretrained.")
    exp.add_argument("store", metavar="model", help=MODEL_HELP + " (e.g. a fine-tune's OUT/disk)")
    exp.add_argument("out_dir", help="an empty or new directory")
    exp.add_argument("--max-shard-size", type=_size_arg, default="5GiB", help="bytes per shard file, e.g. 5GB")
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
    from zo2tier.export_model import export_model

    print(export_model(args.store, args.out_dir, max_shard_bytes=args.max_shard_size))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from zo2tier.planning import describe_plan

    print(describe_plan(args.model, args.budget, storage=args.storage, dtype=args.dtype,
                        calibration=args.calibration, batch=args.batch, seq=args.seq,
                        write_back_every=args.write_back_every, compress=args.compress, device=args.device,
                        estimator=args.estimator, perturbations=args.perturbations))
    return 0


def main(argv: list[str] | None = None) -> int:
    from zo2tier.config import set_cuda_allocator_default

    set_cuda_allocator_default()
    parser = build_parser()
    args = parser.parse_args(_glue_negative_numbers(sys.argv[1:] if argv is None else list(argv)))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        print(f"zo2tier {args.command}: error: {as_flags(str(exc))}", file=sys.stderr)
        return 2
    except (BlockIOError, StoreLockedError) as exc:  # disk full, failing drive, store in use
        print(f"zo2tier {args.command}: error: {as_flags(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path it may not write (permissions, a read-only file system) and the like
        print(f"zo2tier {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"zo2tier {args.command}: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130


def _resume_hint(args: argparse.Namespace) -> str:
    """For an interrupted fine-tune: where its last checkpoint stands and how to go on from it."""
    if args.command != "finetune":
        return ""
    from zo2tier.train.checkpoint import saved_step

    step = saved_step(args.out)
    if step is None:
        return f"; no checkpoint was saved in {args.out} yet (one is saved at every --eval-every)"
    return f"; the checkpoint in {args.out} is at step {step}: the same command with --resume goes on from it"


_PY_HINT = re.compile(r"\b(disk_dir|write_back_every|storage|compress|placement|budget|device|dtype|batch_size|"
                      r"steps|max_length|eval_every|eval_max|lr|eps|seed)=('([^']*)'|[^\s,;)]+)")


def as_flags(message: str) -> str:
    """A library error's hints in Python syntax (``disk_dir='runs/disk'``) written as CLI flags
    (``--disk-dir runs/disk``).

    >>> as_flags("pass disk_dir='runs/disk'")
    'pass --disk-dir runs/disk'
    """
    def flag(m: re.Match) -> str:
        value = m.group(3) if m.group(3) is not None else m.group(2)
        return f"--{m.group(1).replace('_', '-')} {value}"

    return _PY_HINT.sub(flag, message)


if __name__ == "__main__":
    sys.exit(main())
