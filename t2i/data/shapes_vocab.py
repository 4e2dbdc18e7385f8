"""Which words of a prompt the shapes world knows (for the shapes family's out-of-world warning).

A model trained only on shapes-world captions has never seen any other word: "a photo of a cat"
gives it nothing to draw, and it returns a blank canvas. `out_of_world_warning` names the words
it does not know, so the user hears why instead of getting a blank image without a word.

The vocabulary is read from the caption language itself (`t2i.data.captions`: colours, shapes and
their plurals, sizes, number words, regions, relations, backgrounds, filler phrases), so it is
every word a training caption can contain and nothing else. A1111 prompt syntax (`(red:1.3)`,
`[...]`, `BREAK`) is not a word. The check is lenient about what the judge's grammar would refuse
(word order, a count that disagrees with its noun): it only names words the model never saw.
"""

from __future__ import annotations

import functools
import re

from t2i.data import captions as lang

# Words that join phrases in the templates ("a red circle and a blue square", "... with ...")
# and the background phrase's own words ("on a black background").
_JOINERS = ("a", "an", "and", "with", "is", "background")


@functools.cache
def vocabulary() -> frozenset[str]:
    """Every word a shapes-world caption can contain, lower case."""
    phrases = [*lang.COLOURS, *lang.SHAPES, *lang.PLURALS.values(), *lang.SIZE_WORDS, *lang.BACKGROUNDS,
               *lang.NUMBER_WORDS, *lang.RELATION_PHRASES, *lang.PREFIXES, *lang.REGION_FILLER, *_JOINERS]
    phrases += [p for variants in lang.REGION_PHRASES.values() for p in variants]
    return frozenset(w for phrase in phrases for w in phrase.split())


# A1111 emphasis weights `:1.3`, the BREAK keyword; everything else that is not a letter separates words.
_SYNTAX = re.compile(r":\s*-?[\d.]+|\bBREAK\b")


def unknown_words(prompt: str) -> list[str]:
    """The words of `prompt` outside the shapes world's vocabulary, in order, each once."""
    words = re.findall(r"[a-z]+(?:'[a-z]+)?", _SYNTAX.sub(" ", prompt).lower())
    known = vocabulary()
    return list(dict.fromkeys(w for w in words if w not in known))


def out_of_world_warning(prompt: str) -> str | None:
    """A one-line warning naming the words of `prompt` the shapes model never saw; None if it knows all."""
    unknown = unknown_words(prompt)
    if not unknown:
        return None
    return (f"the shapes model does not know {', '.join(repr(w) for w in unknown[:8])}"
            f"{' ...' if len(unknown) > 8 else ''} in {prompt[:60]!r}: it draws only the shapes world's "
            "words (colours, shapes, sizes, counts, places, relations, backgrounds; docs/SHAPES_WORLD.md)")
