"""Paired comparisons of two arms judged on the same prompts and seeds (ablations, scripts/).

Two arms' pass/fail verdicts on the same items differ only where one passes and the other fails; the exact
McNemar test asks how likely a split of those discordant items at least as uneven would be if each were a fair
coin's flip (the arms equally good).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p from the discordant counts (items only arm A passes, items only arm B passes)."""
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def discordant(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """(items only a passes, items only b passes) of two verdict lists over the same items."""
    if len(a) != len(b):
        raise ValueError(f"paired verdicts need the same items, got {len(a)} and {len(b)}")
    return sum(x and not y for x, y in zip(a, b, strict=True)), sum(y and not x for x, y in zip(a, b, strict=True))
