"""Reading shapes-world prompts back into claims: the inverse of `t2i.data.captions`.

The parser accepts exactly the caption language of `t2i.data.captions` (canonical words
plus its filler phrases); any other word is an error that names it, so a prompt the judge
cannot check is never scored as if it could.

Grammar (after lower-casing; commas count as 'and'):
    prompt    := [prefix] body [background]
    prefix    := 'an image of' | 'a picture of' | 'a drawing of' | 'there is' | 'there are' | 'exactly'
    body      := phrase ['is'] relation phrase | phrase {('and' | ',' | 'with') phrase}
    phrase    := ['exactly'] quantity [size] [colour] shape-noun [region]
    quantity  := 'a' | 'an' | 'one' | 'two' | 'three' | 'four'
    relation  := 'above' | 'below' | ['to the'] 'left of' | ['to the'] 'right of'
    region    := words from {on, in, at, the, side, corner} with top/bottom/left/right, or center
    background:= 'on a' ('black' | 'gray' | 'white') 'background'
A number word or a plural anywhere makes the prompt a counting prompt: every count in it is
then exact ('two orange circles and a cyan square' means exactly one cyan square).
`new_shapes` (opt-in) adds shape nouns outside the v1 contract (`world.NEW_SHAPES`, e.g. 'ring'/'rings').
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from t2i.data import captions as lang
from t2i.data.shapes.world import NEW_SHAPES

_SINGULAR = {p: s for s, p in lang.PLURALS.items()}
_ALL_PLURALS = {**lang.PLURALS, **NEW_SHAPES}
_REGION_WORDS = {"top", "bottom", "left", "right", "center"}


class PromptError(ValueError):
    """A prompt outside the shapes-world caption grammar."""


@dataclass
class ObjectClaim:
    """One noun phrase: `count` objects of a kind, optionally sized and placed.

    colour/size None mean any; region is (vertical, horizontal) as in
    `t2i.data.shapes.world.region_holds`, or None. exact: the count is exact (counting prompts),
    else it is a minimum.
    """

    shape: str
    colour: str | None = None
    size: str | None = None
    count: int = 1
    exact: bool = False
    region: tuple[str | None, str | None] | None = None

    def describe(self) -> str:
        words = [w for w in (self.size, self.colour) if w]
        noun = _ALL_PLURALS[self.shape] if self.count > 1 else self.shape
        return " ".join([str(self.count)] + words + [noun])


@dataclass
class Claims:
    """Everything a prompt says: objects, an optional relation between objects[0] and
    objects[1] (`relation` is 'above' / 'below' / 'left of' / 'right of'), a background."""

    text: str
    objects: list[ObjectClaim] = field(default_factory=list)
    relation: str | None = None
    background: str | None = None

    @property
    def counting(self) -> bool:
        return any(o.exact for o in self.objects)


def _tokens(text: str) -> list[str]:
    text = text.lower().strip().rstrip(".").replace(",", " , ")
    return text.split()


def _strip_background(tokens: list[str], text: str) -> tuple[list[str], str | None]:
    found = None
    out: list[str] = []
    i = 0
    while i < len(tokens):
        window = tokens[i:i + 4]
        if len(window) == 4 and window[0] == "on" and window[1] in ("a", "an") and window[3] == "background":
            if window[2] not in lang.BACKGROUNDS:
                raise PromptError(f"unknown background {window[2]!r} in {text!r}")
            if found is not None:
                raise PromptError(f"two backgrounds in {text!r}")
            found = window[2]
            i += 4
        else:
            out.append(tokens[i])
            i += 1
    return out, found


def _strip_prefixes(tokens: list[str]) -> list[str]:
    prefixes = sorted((p.split() for p in lang.PREFIXES), key=len, reverse=True)
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if tokens[: len(p)] == p:
                tokens, changed = tokens[len(p):], True
    return tokens


def _find_relation(tokens: list[str], text: str) -> tuple[list[str], str, list[str]] | None:
    phrases = sorted(((k.split(), v) for k, v in lang.RELATION_PHRASES.items()), key=lambda kv: -len(kv[0]))
    hits = []
    i = 0
    while i < len(tokens):
        for words, rel in phrases:
            if tokens[i:i + len(words)] == words:
                hits.append((i, len(words), rel))
                i += len(words) - 1
                break
        i += 1
    if not hits:
        return None
    if len(hits) > 1:
        raise PromptError(f"more than one relation in {text!r}")
    i, n, rel = hits[0]
    left = tokens[:i]
    if left and left[-1] == "is":
        left = left[:-1]
    return left, rel, tokens[i + n:]


def _region(words: list[str], text: str) -> tuple[str | None, str | None]:
    for w in words:
        if w not in _REGION_WORDS and w not in lang.REGION_FILLER:
            raise PromptError(f"unknown word {w!r} in {text!r}")
    named = [w for w in words if w in _REGION_WORDS]
    if not named:
        raise PromptError(f"region phrase without a region word in {text!r}")
    if "center" in named:
        if len(named) > 1:
            raise PromptError(f"'center' combined with another region in {text!r}")
        return ("center", "center")
    vertical = [w for w in named if w in ("top", "bottom")]
    horizontal = [w for w in named if w in ("left", "right")]
    if len(vertical) > 1 or len(horizontal) > 1:
        raise PromptError(f"contradictory region in {text!r}")
    return (vertical[0] if vertical else None, horizontal[0] if horizontal else None)


def _phrase(tokens: list[str], text: str, new_shapes: Sequence[str] = ()) -> tuple[ObjectClaim, bool]:
    """One noun phrase -> (claim, whether it used a number word or a plural)."""
    if tokens and tokens[0] == "exactly":
        tokens = tokens[1:]
    if not tokens:
        raise PromptError(f"empty object phrase in {text!r}")
    q, rest = tokens[0], tokens[1:]
    if q in ("a", "an"):
        count, numbered = 1, False
    elif q in lang.NUMBER_WORDS:
        count, numbered = lang.NUMBER_WORDS[q], True
    else:
        raise PromptError(f"expected 'a', 'an' or a number, got {q!r} in {text!r}")
    claim = ObjectClaim(shape="")
    if rest and rest[0] in lang.SIZE_WORDS:
        claim.size, rest = rest[0], rest[1:]
    if rest and rest[0] in lang.COLOURS:
        claim.colour, rest = rest[0], rest[1:]
    if not rest:
        raise PromptError(f"missing shape in {text!r}")
    noun, rest = rest[0], rest[1:]
    if noun in lang.SHAPES or noun in new_shapes:
        plural = False
    elif noun in _SINGULAR:
        noun, plural = _SINGULAR[noun], True
    elif noun in (singular := {NEW_SHAPES[n]: n for n in new_shapes}):
        noun, plural = singular[noun], True
    else:
        raise PromptError(f"unknown word {noun!r} (expected a shape) in {text!r}")
    if plural != (count > 1):
        raise PromptError(f"number and noun disagree ({q!r} ... {rest and rest[0] or noun!r}) in {text!r}")
    claim.shape, claim.count = noun, count
    if rest:
        claim.region = _region(rest, text)
    return claim, numbered or plural


def _split(tokens: list[str]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for t in tokens:
        if t in ("and", ",", "with"):
            parts.append([])
        else:
            parts[-1].append(t)
    return [p for p in parts if p] if any(parts) else [[]]


def check_new_shapes(new_shapes: Sequence[str]) -> None:
    """Refuse a name that is not one of world.NEW_SHAPES (ValueError naming it)."""
    unknown = [n for n in new_shapes if n not in NEW_SHAPES]
    if unknown:
        raise ValueError(f"new shapes {unknown}: the world draws {sorted(NEW_SHAPES)} outside its contract")


def parse_prompt(text: str, new_shapes: Sequence[str] = ()) -> Claims:
    """Parses a shapes-world prompt into Claims; raises PromptError on anything else.
    new_shapes: names of world.NEW_SHAPES the prompt may also use (default: the v1 language only)."""
    check_new_shapes(new_shapes)
    tokens, background = _strip_background(_tokens(text), text)
    tokens = _strip_prefixes(tokens)
    claims = Claims(text=text, background=background)
    relation = _find_relation(tokens, text)
    if relation is not None:
        left, claims.relation, right = relation
        for side in (left, right):
            if any(t in ("and", ",", "with") for t in side):
                raise PromptError(f"a relation links two single objects: {text!r}")
        phrases = [left, right]
    else:
        phrases = _split(tokens)
    parsed = [_phrase(p, text, new_shapes) for p in phrases]
    counting = any(numbered for _, numbered in parsed)
    for claim, _ in parsed:
        if claims.relation and claim.count != 1:
            raise PromptError(f"a relation links two single objects: {text!r}")
        claim.exact = counting
        claims.objects.append(claim)
    return claims


def family_of(prompt: str | Claims) -> str:
    """The family a prompt is scored in: background > relation > counting > binding > region > single."""
    claims = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if claims.background is not None:
        return "background"
    if claims.relation is not None:
        return "relation"
    if claims.counting:
        return "counting"
    if len(claims.objects) >= 2:
        return "binding"
    if claims.objects[0].region is not None:
        return "region"
    return "single"


# ----------------------------------------------------------------------------- prompt files
def read_prompt_file(path: str) -> list[tuple[str, str]]:
    """(family, prompt) pairs from a file of 'family<TAB>prompt' or bare prompt lines
    ('#' comments and blank lines skipped; a bare prompt's family is inferred)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            family, _, prompt = line.partition("\t") if "\t" in line else ("", "", line)
            out.append((family or family_of(prompt), prompt.strip()))
    return out


def first_per_family(pairs: Sequence[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """The first n (family, prompt) pairs of each family, in their order (a quick look at a set)."""
    taken: dict[str, int] = {}
    kept = []
    for family, text in pairs:
        taken[family] = taken.get(family, 0) + 1
        if taken[family] <= n:
            kept.append((family, text))
    return kept
