"""The caption language of the shapes world (docs/SHAPES_WORLD.md): vocabulary and templates.

This module is the grammar only; it knows nothing about images. `t2i.data.shapes` decides
which facts are true of a scene and asks these builders for words; the judge's parser
(`t2i.data.shapes.prompts`) reads captions back with the same vocabulary and filler phrases, so
every template written here is a template the parser accepts.
"""

from __future__ import annotations

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
SIZE_WORDS = ("small", "medium", "large")
BACKGROUNDS = ("white", "black", "gray")
NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("above", "below", "left of", "right of")
# Relation words as written in captions -> canonical relation.
RELATION_PHRASES = {
    "above": "above", "below": "below", "left of": "left of", "right of": "right of",
    "to the left of": "left of", "to the right of": "right of",
}

# Paraphrase templates. `{np}` is one noun phrase, `{a}`/`{b}` the two sides of a relation,
# `{list}` a conjunction of noun phrases, `{region}` a region phrase.
SINGLE_TEMPLATES = ("{np}", "{np}", "an image of {np}", "a picture of {np}", "there is {np}",
                    "a drawing of {np}")
REGION_TEMPLATES = ("{np} {region}", "{np} {region}", "there is {np} {region}", "an image of {np} {region}",
                    "a picture of {np} {region}")
BINDING_TEMPLATES = ("{list}", "{list}", "an image of {list}", "a picture of {list}", "a drawing of {list}")
RELATION_TEMPLATES = ("{a} {rel} {b}", "{a} {rel} {b}", "{a} is {rel} {b}", "there is {a} {rel} {b}",
                      "an image of {a} {rel} {b}")
COUNTING_TEMPLATES = ("{list}", "{list}", "there are {list}", "exactly {list}", "an image of {list}",
                      "a picture of {list}")
# Leading phrases that carry no meaning; the parser strips them.
PREFIXES = ("an image of", "a picture of", "a drawing of", "there is", "there are", "exactly")

# Region phrases by (vertical, horizontal) word pair; None means that axis is not stated.
REGION_PHRASES: dict[tuple[str | None, str | None], tuple[str, ...]] = {
    (None, "left"): ("on the left", "on the left side"),
    (None, "right"): ("on the right", "on the right side"),
    ("top", None): ("at the top",),
    ("bottom", None): ("at the bottom",),
    ("center", "center"): ("in the center", "at the center"),
}
for _v in ("top", "bottom"):
    for _h in ("left", "right"):
        REGION_PHRASES[(_v, _h)] = (f"in the {_v} {_h}", f"in the {_v} {_h} corner", f"at the {_v} {_h}")
# Words a region phrase may contain besides the region words themselves.
REGION_FILLER = ("on", "in", "at", "the", "side", "corner")


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def article(word: str) -> str:
    """'a' or 'an' before `word`."""
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(colour: str, shape: str, size: str | None = None, count: int | None = None,
                number_word: bool = False) -> str:
    """'a small red circle', 'three green triangles', 'one blue square'.

    count None or 1 with number_word=False gives the article; a count of 2-4 (or
    number_word=True) gives the number word, and plural nouns for counts above one.
    """
    words = [w for w in (size, colour) if w]
    n = count or 1
    noun = PLURALS[shape] if n > 1 else shape
    head = " ".join(words + [noun])
    if n == 1 and not number_word:
        return f"{article(head)} {head}"
    return f"{COUNT_WORDS[n]} {head}"


def conjunction(phrases: list[str], rng: np.random.Generator) -> str:
    """'A and B', 'A, B and C', sometimes 'A and B and C'."""
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) > 2 and rng.random() < 0.3:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def region_phrase(vertical: str | None, horizontal: str | None, rng: np.random.Generator) -> str:
    return _pick(rng, REGION_PHRASES[(vertical, horizontal)])


def with_background(text: str, background: str) -> str:
    """Appends 'on a black background' unless the background is the default white."""
    return text if background == "white" else f"{text} on a {background} background"


def fill(templates: tuple[str, ...], rng: np.random.Generator, **slots: str) -> str:
    return _pick(rng, templates).format(**slots)
