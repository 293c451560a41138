"""Labelled text in, token batches out: CSV/JSONL loading, deduplication, balanced seeded splits, prompts.

A task is a prompt template with a ``{text}`` slot and one *label word* per class, as MeZO does for
SST-2 (``"{text} It was"`` -> ``" great"`` / ``" terrible"``). A classifier reads the model's next-token
log-probabilities of the label words at the end of the prompt; an LM loss trains on the label word's tokens.
"""

from __future__ import annotations

import csv
import json
import os
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Example:
    """One labelled text."""

    text: str
    label: str


@dataclass(frozen=True)
class LabelWords:
    """Class labels in order, and the word the model should say for each.

    Example::

        words = LabelWords.parse("positive=great,negative=terrible")
        words.labels  # ('positive', 'negative')
    """

    labels: tuple[str, ...]
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise ValueError(f"label words {dict(zip(self.labels, self.words))} name fewer than 2 classes; give 2+")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"label words repeat a label: {list(self.labels)}; name each label once")
        if len(set(self.words)) != len(self.words) or not all(w.strip() for w in self.words):
            raise ValueError(f"label words {list(self.words)} must be non-empty and distinct")

    @classmethod
    def parse(cls, text: str) -> LabelWords:
        """``"positive=great,negative=terrible"`` -> labels ('positive', 'negative'), words ('great', 'terrible')."""
        labels, words = [], []
        for part in filter(None, (p.strip() for p in text.split(","))):
            label, sep, word = part.partition("=")
            if not sep:
                raise ValueError(f"label-words entry {part!r} needs '=': write positive=great,negative=terrible")
            labels.append(label.strip())
            words.append(word.strip())
        return cls(tuple(labels), tuple(words))

    def index(self, label: str) -> int:
        return self.labels.index(label)


@dataclass(frozen=True)
class Prompt:
    """How an example becomes tokens: ``template.format(text=...)`` then ``word_prefix + label word``.

    Example::

        Prompt("{text}\\nSentiment:", LabelWords.parse("positive=positive,negative=negative"))
    """

    template: str
    label_words: LabelWords
    word_prefix: str = " "

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise ValueError(f"template {self.template!r} has no '{{text}}' slot; write e.g. '{{text}} It was'")
        try:
            self.template.format(text="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"template {self.template!r} is not a valid format string ({exc}); "
                             "use only the '{text}' slot and write literal braces as '{{' '}}'") from None

    def render(self, text: str) -> str:
        return self.template.format(text=text)

    def answer(self, label_index: int) -> str:
        return self.word_prefix + self.label_words.words[label_index]


# ---- loading ----------------------------------------------------------------------------------------
def load_examples(
    path: str | os.PathLike,
    *,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "utf-8",
) -> list[Example]:
    """Read a ``.csv`` (header row), ``.jsonl`` (one object a line) or ``.json`` (a list of objects, or one
    object a line) file into examples.

    Labels are read as strings (``1`` and ``"1"`` are the same label; JSON ``true`` is ``"true"``). Rows with
    an empty text are skipped. UTF-8 files may start with a byte-order mark.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist; give a .csv or .jsonl file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"data file {path!r} has extension {ext!r}; use .csv or .jsonl")
    # utf-8-sig reads UTF-8 and drops a leading byte-order mark (Excel's CSVs)
    read_as = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        rows = list(_read_csv(path, read_as) if ext == ".csv" else _read_json(path, read_as))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not {encoding} text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                         "pass its encoding, e.g. --encoding latin-1") from None
    except LookupError:
        raise ValueError(f"encoding {encoding!r} is unknown; use e.g. utf-8 or latin-1") from None
    if not rows:
        raise ValueError(f"{path} has no data rows (it is empty or holds only a header); give a file with a "
                         f"header row naming {text_column!r} and {label_column!r}, then labelled rows")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i + 1} is a JSON {type(row).__name__} ({json.dumps(row)[:40]}), not an "
                             f"object; write one object per row, e.g. {{\"{text_column}\": ..., \"{label_column}\": ...}}")
        missing = [c for c in (text_column, label_column) if c not in row]
        if missing:
            raise ValueError(f"{path}: row {i + 1} has no column(s) {missing}; it has {sorted(map(str, row))}. "
                             "Pass --text-column/--label-column")
        text = _as_text(row[text_column])
        if text:
            out.append(Example(text, _as_text(row[label_column])))
    return out


def _as_text(value: Any) -> str:
    """A cell as text: JSON's true/false/null keep their JSON spelling (null is empty)."""
    if value is None:
        return ""
    return (json.dumps(value) if isinstance(value, bool) else str(value)).strip()


def _read_csv(path: str, encoding: str) -> Iterable[dict[str, Any]]:
    with open(path, encoding=encoding, newline="") as f:
        yield from csv.DictReader(f)


def _read_json(path: str, encoding: str) -> Iterable[Any]:
    """The rows of a JSON-lines file, or of a ``.json`` file holding one list of objects."""
    with open(path, encoding=encoding) as f:
        if path.lower().endswith(".json") and f.read(4096).lstrip().startswith("["):
            f.seek(0)
            try:
                yield from json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not a JSON list ({exc})") from None
            return
        f.seek(0)
        for i, line in enumerate(f):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {i + 1} is not JSON ({exc}); write one object a line, or a "
                                     ".json file holding one list of objects") from None


# ---- cleaning and splitting -------------------------------------------------------------------------
def dedup(examples: Sequence[Example]) -> list[Example]:
    """Keep the first copy of each text; drop texts that occur with more than one label.

    Repeated texts (retweets) would otherwise land in both train and test.
    """
    labels_of: dict[str, set[str]] = {}
    for ex in examples:
        labels_of.setdefault(ex.text, set()).add(ex.label)
    seen: set[str] = set()
    out = []
    for ex in examples:
        if ex.text not in seen and len(labels_of[ex.text]) == 1:
            seen.add(ex.text)
            out.append(ex)
    return out


def keep_labels(examples: Sequence[Example], labels: Sequence[str]) -> list[Example]:
    """The examples whose label is in ``labels``."""
    wanted = set(labels)
    return [ex for ex in examples if ex.label in wanted]


def balanced_splits(
    examples: Sequence[Example], sizes: Sequence[int], labels: Sequence[str], *, seed: int
) -> list[list[Example]]:
    """Disjoint splits of ``sizes[i]`` examples each, with the same count of every label, fixed by ``seed``.

    Each size must divide by the number of labels. Each split is shuffled. Example::

        test, dev, train = balanced_splits(data, [200, 200, 2000], ["positive", "negative"], seed=0)
    """
    n_cls = len(labels)
    by_label = {lab: [ex for ex in examples if ex.label == lab] for lab in labels}
    for size in sizes:
        if size % n_cls:
            raise ValueError(f"split size {size} does not divide by {n_cls} labels; use a multiple of {n_cls}")
    need = sum(sizes) // n_cls
    for lab, items in by_label.items():
        if len(items) < need:
            raise ValueError(f"label {lab!r} has {len(items)} examples but the splits {list(sizes)} need "
                             f"{need} of each; make the splits smaller")
    rng = random.Random(seed)
    for lab in labels:
        rng.shuffle(by_label[lab])
    out, start = [], 0
    for size in sizes:
        per = size // n_cls
        split = [ex for lab in labels for ex in by_label[lab][start : start + per]]
        rng.shuffle(split)
        out.append(split)
        start += per
    return out


# ---- tokens -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncodedSet:
    """A task encoded once: prompt tokens and gold-answer tokens per example, and the label words' ids."""

    prompt_ids: tuple[tuple[int, ...], ...]
    answer_ids: tuple[tuple[int, ...], ...]  # the gold label word's tokens
    targets: tuple[int, ...]  # class index per example
    word_ids: tuple[int, ...]  # first token of each label word, in class order
    pad_id: int

    def __len__(self) -> int:
        return len(self.targets)


def encode(examples: Sequence[Example], prompt: Prompt, tokenizer: Any, *, max_length: int = 64) -> EncodedSet:
    """Tokenize prompts and answers; long prompts lose tokens from the start of the text (the suffix stays).

    Raises if two label words share their first token, since accuracy compares first-token log-probs.
    """
    answers = [answer_ids(prompt, i, tokenizer) for i in range(len(prompt.label_words.labels))]
    unk = getattr(tokenizer, "unk_token_id", None)
    for word, ids in zip(prompt.label_words.words, answers):
        if not ids:
            raise ValueError(f"label word {word!r} encodes to no tokens with this tokenizer; pick another word")
        if unk is not None and unk in ids:
            raise ValueError(f"label word {word!r} maps to the unknown token {tokenizer.unk_token!r} of this "
                             "tokenizer; pick a word in the model's vocabulary")
        if len(ids) > 1:
            pieces = [tokenizer.decode([i]) for i in ids]
            warnings.warn(f"label word {word!r} is {len(ids)} tokens {pieces}: accuracy and the classification "
                          f"objective score its first token {pieces[0]!r} only (the lm objective trains on all "
                          "of them); pick single-token words to score whole words", stacklevel=2)
    firsts = [a[0] for a in answers]
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"label words {list(prompt.label_words.words)} start with the same token; "
                         "pick words whose first tokens differ (e.g. great / terrible)")
    longest = max(len(a) for a in answers)
    if max_length <= longest + 1:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt; raise it above {longest + 1}")
    bos = getattr(tokenizer, "bos_token_id", None)
    prompts, golds, targets = [], [], []
    for ex in examples:
        if ex.label not in prompt.label_words.labels:
            raise ValueError(f"example label {ex.label!r} has no label word; known: {list(prompt.label_words.labels)}")
        cls = prompt.label_words.index(ex.label)
        ids = list(tokenizer(prompt.render(ex.text))["input_ids"])
        room = max_length - len(answers[cls])
        if len(ids) > room:
            keep_bos = bool(ids) and bos is not None and ids[0] == bos
            ids = ids[:1] + ids[len(ids) - room + 1 :] if keep_bos else ids[len(ids) - room :]
        prompts.append(tuple(ids))
        golds.append(answers[cls])
        targets.append(cls)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return EncodedSet(tuple(prompts), tuple(golds), tuple(targets), tuple(firsts), int(pad))


def answer_ids(prompt: Prompt, label_index: int, tokenizer: Any) -> tuple[int, ...]:
    """The tokens of label word ``label_index`` as they follow a rendered prompt.

    Tokenized after a prompt and cut off it, not alone: a SentencePiece tokenizer that prepends "▁" to every
    input (Llama-2, Mistral) reads " great" alone as ["▁", "▁great"], which would give every label word the
    same first token. Where the prompt's own tokens are not a prefix of the joined ones, the word alone."""
    word = prompt.answer(label_index)
    context = prompt.render("x")
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    joined = tokenizer(context + word, add_special_tokens=False)["input_ids"]
    if len(joined) > len(head) and list(joined[: len(head)]) == list(head):
        return tuple(joined[len(head) :])
    return tuple(tokenizer(word, add_special_tokens=False)["input_ids"])


def collate(data: EncodedSet, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """A right-padded batch of prompt + gold answer for ``indices``.

    Keys: ``input_ids``/``attention_mask`` (B, T); ``labels`` (B, T), -100 except on the answer tokens;
    ``pred_pos`` (B,), the position whose logits predict the answer's first token; ``targets`` (B,);
    ``word_ids`` (C,). Causal attention means the logits at ``pred_pos`` never see the answer.
    """
    seqs = [data.prompt_ids[i] + data.answer_ids[i] for i in indices]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), data.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    pred_pos = torch.empty(len(seqs), dtype=torch.long)
    for row, (i, seq) in enumerate(zip(indices, seqs)):
        n_prompt = len(data.prompt_ids[i])
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, n_prompt : len(seq)] = ids[row, n_prompt : len(seq)]
        pred_pos[row] = n_prompt - 1
    targets = torch.tensor([data.targets[i] for i in indices], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pred_pos": pred_pos,
            "targets": targets, "word_ids": torch.tensor(data.word_ids, dtype=torch.long)}


def batch_indices(n_examples: int, batch_size: int, step: int, *, seed: int) -> list[int]:
    """The example indices of training step ``step``: epochs of seeded permutations, a pure function of step.

    Resuming at step t therefore needs no sampler state.
    """
    if batch_size > n_examples:
        raise ValueError(f"batch_size={batch_size} exceeds the {n_examples} training examples; lower it")
    per_epoch = n_examples // batch_size
    epoch, k = divmod(step, per_epoch)
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[k * batch_size : (k + 1) * batch_size]
