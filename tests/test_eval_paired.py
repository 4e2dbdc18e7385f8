"""The paired test the ablation scripts report (t2i.eval.paired)."""

from __future__ import annotations

import pytest

from t2i.eval.paired import discordant, mcnemar_p


def test_mcnemar_p_is_the_two_sided_binomial_tail_of_the_discordant_items():
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64) and mcnemar_p(6, 0) == mcnemar_p(0, 6)
    assert mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_p(46, 28) == pytest.approx(0.047, abs=5e-4)  # unCLIP's two priors (docs/FAMILIES.md)


def test_discordant_counts_the_items_one_arm_alone_passes():
    assert discordant([True, True, False, False, True], [True, False, True, False, False]) == (2, 1)
    with pytest.raises(ValueError, match="same items"):
        discordant([True], [True, False])
