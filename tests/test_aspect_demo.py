"""scripts/aspect_demo.py's paired comparison (issue 21): the McNemar test on image-by-image cut flags."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from aspect_demo import mcnemar_p, paired  # noqa: E402


def test_mcnemar_p_is_the_exact_two_sided_binomial_tail():
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(10, 0) == mcnemar_p(0, 10) == 2 / 2**10
    assert math.isclose(mcnemar_p(2, 9), 2 * sum(math.comb(11, i) for i in range(3)) / 2**11)
    assert mcnemar_p(6, 7) == 1.0  # a tail over one half is capped


def test_paired_counts_images_cut_under_one_condition_only(tmp_path, capsys):
    report = {"m/a.safetensors 64x64 crop 0,0": {"top_left_flags": "1100110"},
              "m/a.safetensors 64x64 crop 16,16": {"top_left_flags": "1111111"},
              "m/a.safetensors 80x48 crop 0,0": {"top_left_flags": "000"},
              "m/a.safetensors 80x48 crop 12,20": {"top_left_flags": "110"}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    paired([str(tmp_path / "r.json")], "crop 0,0", "crop [1-9]")
    out = capsys.readouterr().out
    assert "64x64: top/left cut by A only 0, by B only 3 of 7" in out
    assert "80x48: top/left cut by A only 0, by B only 2 of 3" in out
    assert f"pooled: A only 0, B only 5; McNemar p = {2 / 2**5:.2g}" in out


def test_paired_refuses_patterns_that_match_nothing_or_several_rows(tmp_path):
    report = {"m/a.safetensors 64x64 crop 0,0": {"top_left_flags": "10"},
              "m/b.safetensors 64x64 crop 0,0": {"top_left_flags": "01"}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="no canvas has a row"):
        paired([str(tmp_path / "r.json")], "a.safetensors", "crop [1-9]")
    with pytest.raises(SystemExit, match="each must pick one"):
        paired([str(tmp_path / "r.json")], "crop 0,0", "b.safetensors")
