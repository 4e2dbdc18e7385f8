"""Recaptioning (issue 17; DALL-E 3, seed 000 9.3): a layout's complete caption, written from the layout
with the world's caption builders (`t2i.data.captions`, the grammar's writer, not its parser)."""

from __future__ import annotations

import numpy as np

from t2i.data import captions as lang
from t2i.layout.spec import Layout


def layout_caption(layout: Layout, rng: np.random.Generator | None = None) -> str:
    """The complete caption of a layout, every object's phrase in its order and the background
    ('a small red circle, a blue square and a green cross on a black background'): the recaptioning
    of DALL-E 3 (seed 000 9.3), made from the layout, so it never disagrees with the boxes."""
    phrases = [o.phrase for o in layout.objects]
    if not phrases:
        text = "nothing"
    elif rng is None or len(phrases) < 3:
        text = ", ".join(phrases[:-1]) + (" and " if len(phrases) > 1 else "") + phrases[-1]
    else:
        text = lang.conjunction(phrases, rng)
    return lang.with_background(text, layout.background or "white")
