"""A word outside the shapes world's v1 contract (issue 21's new-word demonstration): the ring is drawn,
captioned and judged only when asked for; the ordinary world, parser and judge are unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from t2i.data.shapes import Scene, ShapeObject, render_array, shapes_example
from t2i.data.shapes.new_words import (
    new_word_example,
    new_word_prompts,
    placeholder_caption,
    with_new_shape,
    write_new_word_folder,
)
from t2i.data.shapes.prompts import PromptError, parse_prompt
from t2i.eval.shapes_judge import detect, evaluate, judge

NEW = ("ring",)


def test_a_ring_has_its_hole_and_the_judge_reads_it_only_when_asked():
    ring = render_array(Scene([ShapeObject("ring", "red", "large", 16, 16, 32)]))
    assert (ring[32, 32] == 255).all() and (ring[32, 18] == (230, 25, 25)).all()  # white hole, red band
    assert [d.shape for d in detect(ring, NEW)] == ["ring"]
    assert [d.shape for d in detect(ring)] != ["ring"]  # v1 templates only: a poor circle at best
    disc = render_array(Scene([ShapeObject("circle", "red", "large", 16, 16, 32)]))
    assert [d.shape for d in detect(disc, NEW)] == ["circle"]  # a disc is no ring


def test_the_parser_takes_new_shapes_only_when_asked():
    claims = parse_prompt("two red rings and a blue square", NEW)
    assert [(c.shape, c.colour, c.count, c.exact) for c in claims.objects] == [
        ("ring", "red", 2, True), ("square", "blue", 1, True)]
    with pytest.raises(PromptError, match="'ring'"):
        parse_prompt("a red ring")
    with pytest.raises(ValueError, match="star"):
        parse_prompt("a red star", ("star",))


def test_new_word_scenes_are_judged_true_and_rename_one_kind_only():
    scene = Scene([ShapeObject("circle", "red", "medium", 4, 4, 18),
                   ShapeObject("circle", "blue", "medium", 40, 40, 18),
                   ShapeObject("circle", "red", "small", 40, 4, 12)], family="counting", n_focus=2)
    changed, caption = with_new_shape(scene, "two red circles and a blue circle", "ring")
    assert caption == "two red rings and a blue circle"
    assert [o.shape for o in changed.objects] == ["ring", "circle", "ring"]
    results = [judge(render_array(s), c, NEW).ok for s, c in (new_word_example(21, i) for i in range(40))]
    assert all(results)


def test_ordinary_examples_and_verdicts_are_unchanged():
    scene, caption = shapes_example(21, 3)
    assert "ring" not in caption and all(o.shape != "ring" for o in scene.objects)
    image = render_array(scene)
    plain, extended = evaluate([image], [caption]), evaluate([image], [caption], new_shapes=NEW)
    assert plain["results"] == extended["results"] and plain["overall"] == 1.0


def test_prompts_and_folders(tmp_path):
    pairs = new_word_prompts(12)
    assert len({p for _, p in pairs}) == 12 and all("ring" in p for _, p in pairs)
    folder = write_new_word_folder(tmp_path / "lora", 8, share=0.5)
    captions = [p.read_text().strip() for p in sorted(folder.glob("*.txt"))]
    assert len(captions) == len(list(folder.glob("*.png"))) == 8
    assert 0 < sum("ring" in c for c in captions) < 8  # a mix of new-word and ordinary scenes
    ti = write_new_word_folder(tmp_path / "ti", 6, word="[name]")
    assert all("[name]" in p.read_text() and "ring" not in p.read_text() for p in ti.glob("*.txt"))
    assert placeholder_caption("two red rings and a ring", "ring", "<w>") == "two red <w>s and a <w>"
    assert np.asarray(render_array(new_word_example(21, 0)[0])).shape == (64, 64, 3)
