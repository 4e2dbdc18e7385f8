"""True captions of a scene: the primary caption of the family it was drawn for, and others for
every family the scene also supports, each in a random paraphrase of `t2i.data.captions`.

Each caption helper can also report the objects it mentions, in the order the caption names them
(`said`, an out-list): the layout planner's training targets (`primary_with_objects`). Reporting
draws no random numbers, so `captions` and the judge's held-out prompts are unchanged by it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from t2i.data import captions as lang
from t2i.data.shapes.world import CAPTION_SAFETY, Scene, ShapeObject, regions_of, relation_holds


def _np(obj: ShapeObject, rng: np.random.Generator) -> str:
    # Medium is the contract's default size, so it is usually left unsaid; small and large
    # are usually named (a caption may always leave the size out).
    named = rng.random() < (0.2 if obj.size == "medium" else 0.8)
    return lang.noun_phrase(obj.colour, obj.shape, obj.size if named else None)


def _say(said: list[ShapeObject] | None, objs: list[ShapeObject]) -> None:
    if said is not None:
        said.extend(objs)


def _single(obj: ShapeObject, rng: np.random.Generator, said: list[ShapeObject] | None = None) -> str:
    _say(said, [obj])
    return lang.fill(lang.SINGLE_TEMPLATES, rng, np=_np(obj, rng))


def _region(obj: ShapeObject, rng: np.random.Generator, said: list[ShapeObject] | None = None) -> str | None:
    v, h = regions_of(obj, CAPTION_SAFETY)
    options = []
    if v == "center" and h == "center":
        options.append(("center", "center"))
    if v in ("top", "bottom") and h in ("left", "right"):
        options += [(v, h), (v, h)]
    if v in ("top", "bottom"):
        options.append((v, None))
    if h in ("left", "right"):
        options.append((None, h))
    if not options:
        return None
    vv, hh = options[rng.integers(len(options))]
    _say(said, [obj])
    return lang.fill(lang.REGION_TEMPLATES, rng, np=_np(obj, rng), region=lang.region_phrase(vv, hh, rng))


def _binding(objs: list[ShapeObject], rng: np.random.Generator,
             said: list[ShapeObject] | None = None) -> str | None:
    seen, distinct = set(), []
    for o in objs:
        if o.kind not in seen:
            seen.add(o.kind)
            distinct.append(o)
    if len(distinct) < 2:
        return None
    order = rng.permutation(len(distinct))
    _say(said, [distinct[i] for i in order])
    text = lang.conjunction([_np(distinct[i], rng) for i in order], rng)
    return lang.fill(lang.BINDING_TEMPLATES, rng, list=text)


def _relation(a: ShapeObject, b: ShapeObject, rng: np.random.Generator,
              said: list[ShapeObject] | None = None) -> str | None:
    if a.kind == b.kind:
        return None
    if rng.random() < 0.5:
        a, b = b, a
    rels = [r for r in lang.RELATIONS if relation_holds(r, a.centre, b.centre, CAPTION_SAFETY)]
    if not rels:
        return None
    rel = rels[rng.integers(len(rels))]
    _say(said, [a, b])
    words = [w for w, r in lang.RELATION_PHRASES.items() if r == rel]
    return lang.fill(lang.RELATION_TEMPLATES, rng, a=_np(a, rng), rel=words[rng.integers(len(words))],
                     b=_np(b, rng))


def _counting(scene: Scene, kinds: list[tuple[str, str]], rng: np.random.Generator,
              said: list[ShapeObject] | None = None) -> str:
    """Exact counts of each kind listed (counted over the whole scene)."""
    _say(said, [o for kind in kinds for o in scene.objects if o.kind == kind])
    counts = Counter(o.kind for o in scene.objects)
    phrases = []
    for i, kind in enumerate(kinds):
        # 'one' for a lone kind leading the caption, else the article ('... and a cyan square').
        phrases.append(lang.noun_phrase(kind[0], kind[1], count=counts[kind], number_word=i == 0))
    return lang.fill(lang.COUNTING_TEMPLATES, rng, list=lang.conjunction(phrases, rng))


def _primary(scene: Scene, rng: np.random.Generator, said: list[ShapeObject] | None = None) -> str | None:
    focus = scene.objects[: scene.n_focus]
    if scene.family == "single":
        return _single(focus[0], rng, said)
    if scene.family == "region":
        return _region(focus[0], rng, said)
    if scene.family == "binding":
        return _binding(focus, rng, said)
    if scene.family == "relation":
        return _relation(focus[0], focus[1], rng, said)
    kinds = list(dict.fromkeys(o.kind for o in focus))
    return _counting(scene, kinds, rng, said)


def primary_with_objects(scene: Scene, rng: np.random.Generator) -> tuple[str, list[ShapeObject]] | None:
    """The scene's primary caption (what `captions(scene, rng)[0]` is, drawing the same numbers up to
    there) and the objects it mentions in the order it names them (for a counting caption every object
    of each counted kind, kinds in caption order); None when the scene has no primary caption."""
    said: list[ShapeObject] = []
    text = _primary(scene, rng, said)
    if text is None:
        return None
    return lang.with_background(text, scene.background), said


def captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Several true captions of a scene; the first is the primary one of the scene's family.

    The others cover the other families the scene supports (a single object, a region, a
    binding of two objects, a relation, exact counts), each with its own paraphrase.
    Non-white scenes name their background in every caption.
    """
    objs = scene.objects
    out = [_primary(scene, rng)]
    i = int(rng.integers(len(objs)))
    out += [_single(objs[i], rng), _region(objs[i], rng), _single(objs[i], rng)]
    if len(objs) >= 2:
        a, b = (int(v) for v in rng.choice(len(objs), 2, replace=False))
        out += [_binding([objs[a], objs[b]], rng), _relation(objs[a], objs[b], rng)]
    counts = Counter(o.kind for o in objs)
    kinds = sorted(counts, key=lambda k: -counts[k])
    if counts[kinds[0]] >= 2:
        out.append(_counting(scene, kinds[: 1 + int(len(kinds) > 1 and rng.random() < 0.5)], rng))
    elif len(kinds) == 1:
        out.append(_counting(scene, kinds, rng))  # 'one yellow cross': exact, and true
    return list(dict.fromkeys(lang.with_background(c, scene.background) for c in out if c))
