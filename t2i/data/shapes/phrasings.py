"""Phrasings held out of the layout model's training (issue 17), to show that it generalises: captions
written with them are never shown to the planner or the layout renderer, and the judge's held-out
prompts that use them are scored on their own (`t2i eval shapes` reports them as `unseen phrasing`).

They are whole templates and phrases of `t2i.data.captions` (a leading phrase, a relation phrase, a
region phrase, a counting word): a caption uses one when the phrase occurs in it as words.
"""

from __future__ import annotations

import re

HELDOUT_PHRASINGS = ("a drawing of", "to the right of", "corner", "exactly")
_PATTERN = re.compile(r"\b(" + "|".join(re.escape(p) for p in HELDOUT_PHRASINGS) + r")\b")


def uses_heldout_phrasing(caption: str) -> bool:
    """Whether `caption` is written with a phrasing the layout model never saw in training."""
    return _PATTERN.search(caption.lower()) is not None
