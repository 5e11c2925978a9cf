"""Built-in synthetic sentiment dataset (`synthetic-sentiment`), IMDB style: a short film review → positive/negative.

Reviews are assembled from a film, neutral remarks and two or three opinion sentences. A review's label is the
sentiment of most of its opinion sentences, and a third of the reviews carry one sentence of the other sentiment,
so single words do not give the answer away. Deterministic in the seed, like `synthetic-dialogsum`.
"""

from __future__ import annotations

import random
from typing import Iterator

from models.builtins import BUILTIN_DATASETS

NAME = "synthetic-sentiment"
SPLIT_SIZES = BUILTIN_DATASETS[NAME].split_sizes
LABELS = BUILTIN_DATASETS[NAME].labels
DEFAULT_SEED = 4321

FILMS = ["The Long Road", "Night Harbour", "Paper Moons", "The Last Orchard", "Glass City", "Winter Tide",
         "Silent Engines", "The Red Kite", "Summer of Foxes", "Iron Garden", "Blue Lanterns", "The Quiet Hour"]
NEUTRAL = [
    "I watched it on a Sunday evening.", "It runs for about two hours.", "The story is set in a small town.",
    "My brother recommended it.", "I saw it at the local cinema.", "It is based on a novel.",
    "The director made two films before this one.", "Most of it was filmed in winter.",
]
OPINIONS = {
    "positive": [
        "The acting is wonderful.", "I loved the soundtrack.", "The plot is clever and moving.",
        "It is a beautiful film.", "The characters feel real and warm.", "I would happily watch it again.",
        "The ending is brilliant.", "A great cast gives a superb performance.", "It was a joy from start to finish.",
        "The photography is stunning.", "Funny, smart and touching.", "One of the best films this year.",
    ],
    "negative": [
        "The acting is wooden.", "The soundtrack was annoying.", "The plot is dull and predictable.",
        "It is a boring film.", "The characters feel flat and fake.", "I would never watch it again.",
        "The ending is terrible.", "A weak cast gives an awful performance.", "It was a chore from start to finish.",
        "The photography is ugly.", "Silly, slow and pointless.", "One of the worst films this year.",
    ],
}


def _review(r: random.Random, index: int, split: str) -> dict:
    label = r.choice(LABELS)
    other = LABELS[1 - LABELS.index(label)]
    sentences = r.sample(OPINIONS[label], r.randint(2, 3))
    if r.random() < 1 / 3:
        sentences.append(r.choice(OPINIONS[other]))
    sentences += r.sample(NEUTRAL, r.randint(0, 2))
    r.shuffle(sentences)
    opener = r.choice(["I just saw {film}.", "{film} is out now.", "Review of {film}.", "About {film}:"])
    text = " ".join([opener.format(film=r.choice(FILMS)), *sentences])
    return {"id": f"{split}-{index:05d}", "text": text, "label": label}


def generate_split(split: str, seed: int = DEFAULT_SEED) -> list[dict]:
    if split not in SPLIT_SIZES:
        raise KeyError(split)
    r = random.Random(f"{seed}-{split}")
    return [_review(r, i, split) for i in range(SPLIT_SIZES[split])]


def corpus() -> Iterator[str]:
    """Every text of every split, for training the built-in tokenizer."""
    for split in SPLIT_SIZES:
        for example in generate_split(split):
            yield example["text"]
            yield example["label"]
