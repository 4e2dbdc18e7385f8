"""The shapes judge: parser, detector, checker, held-out prompts, evaluate and save_grid."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from t2i.data.shapes import (
    PALETTE,
    Scene,
    ShapeObject,
    captions,
    render,
    render_array,
    sample_scene,
    to_tensor,
)
from t2i.data.shapes import heldout as P
from t2i.eval.shapes_judge import (
    PromptError,
    analyse,
    check,
    connected_components,
    detect,
    evaluate,
    family_of,
    judge,
    parse_prompt,
    save_grid,
)


def _gt_accuracy(n: int, size: int, seed: int = 21) -> tuple[float, int, Counter]:
    ok = total = 0
    failures: Counter = Counter()
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng)
        found = analyse(render_array(scene, size))  # once per image, then every caption
        for c in captions(scene, rng):
            v = check(parse_prompt(c), *found)
            ok += v.ok
            total += 1
            if not v.ok:
                failures[family_of(c)] += 1
    return ok / total, total, failures


@pytest.mark.parametrize(("size", "n"), [(64, 300), (128, 60), (96, 40)])
def test_judge_accepts_rendered_ground_truth(size, n):
    t = time.perf_counter()
    acc, total, failures = _gt_accuracy(n, size)
    print(f"judge on ground truth {size}x{size}: {acc:.4f} of {total} captions, "
          f"{(time.perf_counter() - t) / n * 1e3:.1f} ms/scene; failures {dict(failures)}")
    assert acc >= 0.99


def test_detections_match_ground_truth_objects():
    for i in range(80):
        scene = sample_scene(np.random.default_rng([22, i]))
        for size in (64, 128):
            bg, dets = analyse(render_array(scene, size))
            assert bg == scene.background
            got = sorted((d.colour, d.shape, d.size) for d in dets)
            assert got == sorted((o.colour, o.shape, o.size) for o in scene.objects)
            for o in scene.objects:  # centres read back to a small fraction of a pixel
                d = min(dets, key=lambda d: np.hypot(d.centre[0] - o.centre[0], d.centre[1] - o.centre[1]))
                assert np.hypot(d.centre[0] - o.centre[0], d.centre[1] - o.centre[1]) < 0.35
                assert d.box[2] - d.box[0] == pytest.approx(o.s, abs=0.6)


def _scene(*objs, background="white") -> Scene:
    return Scene([ShapeObject(*o) for o in objs], background)


RED_CIRCLE_LEFT = ("circle", "red", "medium", 4, 24, 18)
RED_CIRCLE_TOP = ("circle", "red", "medium", 24, 4, 18)
BLUE_SQUARE_BOTTOM = ("square", "blue", "medium", 24, 42, 18)
BLUE_SQUARE_RIGHT = ("square", "blue", "medium", 42, 24, 18)


def test_rejects_swapped_colours():
    good = render_array(_scene(RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT))
    swapped = render_array(_scene(("circle", "blue", "medium", 4, 24, 18),
                                  ("square", "red", "medium", 42, 24, 18)))
    prompt = "a red circle and a blue square"
    assert judge(good, prompt).ok
    v = judge(swapped, prompt)
    assert not v.ok and any("red circle" in r for r in v.reasons)


def test_rejects_wrong_counts():
    tri = [("triangle", "green", "small", x, 10, 12) for x in (2, 18, 34, 50)]
    three = render_array(_scene(*tri[:3]))
    assert judge(three, "three green triangles").ok
    assert not judge(render_array(_scene(*tri[:2])), "three green triangles").ok
    assert not judge(render_array(_scene(*tri)), "three green triangles").ok
    # 'a cyan square' inside a counting prompt is exact too
    two_sq = [("square", "cyan", "small", x, 40, 12) for x in (2, 30)]
    circles = [("circle", "orange", "small", x, 10, 12) for x in (2, 30)]
    assert judge(render_array(_scene(*circles, two_sq[0])), "two orange circles and a cyan square").ok
    assert not judge(render_array(_scene(*circles, *two_sq)), "two orange circles and a cyan square").ok
    # outside counting prompts 'a' is 'at least one'
    assert judge(render_array(_scene(*circles, *two_sq)), "an orange circle and a cyan square").ok


def test_rejects_wrong_relation_region_size_background():
    image = render_array(_scene(RED_CIRCLE_TOP, BLUE_SQUARE_BOTTOM))
    assert judge(image, "a red circle above a blue square").ok
    assert judge(image, "a blue square is below a red circle").ok
    assert not judge(image, "a red circle below a blue square").ok
    assert not judge(image, "a red circle left of a blue square").ok  # same column
    assert judge(image, "a red circle at the top").ok
    assert not judge(image, "a red circle at the bottom").ok
    assert not judge(image, "a red circle on the left").ok
    assert judge(image, "a medium red circle").ok
    assert not judge(image, "a large red circle").ok and not judge(image, "a small red circle").ok
    assert not judge(image, "a red circle on a black background").ok
    black = render_array(_scene(("circle", "red", "medium", 24, 4, 18), background="black"))
    assert judge(black, "a red circle on a black background").ok
    assert not judge(black, "a red circle").ok  # white unless the prompt names another
    assert not judge(image, "a green circle").ok and not judge(image, "a red triangle").ok
    # relation margin: centres 6 px apart do not make 'above', 7 px do
    small_circle = ("circle", "red", "small", 10, 20, 12)
    near = render_array(_scene(small_circle, ("square", "blue", "small", 30, 26, 12)))
    assert not judge(near, "a red circle above a blue square").ok
    near7 = render_array(_scene(small_circle, ("square", "blue", "small", 30, 27, 12)))
    assert judge(near7, "a red circle above a blue square").ok


def test_rejects_falsified_captions_of_random_scenes():
    """Change one colour in a true caption to a colour absent from the image: never ok."""
    rejected = total = 0
    for i in range(150):
        rng = np.random.default_rng([23, i])
        scene = sample_scene(rng)
        found = analyse(render_array(scene))
        present = {o.colour for o in scene.objects}
        absent = [c for c in PALETTE if c not in present]
        for c in captions(scene, rng):
            words = c.split()
            k = next(j for j, w in enumerate(words) if w in PALETTE)
            words[k] = absent[i % len(absent)]
            total += 1
            rejected += not check(parse_prompt(" ".join(words)), *found).ok
    assert rejected == total


def test_parser_contract_examples():
    cases = {
        "a red circle": "single",
        "a small blue square on the left": "region",
        "a large green triangle in the top right": "region",
        "a red circle above a blue square": "relation",
        "a yellow diamond left of a pink cross": "relation",
        "a red circle and a blue square": "binding",
        "three green triangles": "counting",
        "two orange circles and a cyan square": "counting",
        "a purple diamond on a black background": "background",
    }
    for text, family in cases.items():
        assert family_of(text) == family, text
    c = parse_prompt("a large green triangle in the top right")
    o = c.objects[0]
    assert (o.shape, o.colour, o.size, o.count, o.exact, o.region) == ("triangle", "green", "large", 1, False,
                                                                     ("top", "right"))
    c = parse_prompt("There are exactly two orange circles, and a cyan square.")
    assert [(o.colour, o.shape, o.count, o.exact) for o in c.objects] == [("orange", "circle", 2, True),
                                                                         ("cyan", "square", 1, True)]
    c = parse_prompt("there is a small yellow circle to the left of a purple cross on a gray background")
    assert c.relation == "left of" and c.background == "gray" and c.objects[1].shape == "cross"
    assert parse_prompt("four pink crosses").objects[0].count == 4
    assert parse_prompt("an orange cross in the center").objects[0].region == ("center", "center")


@pytest.mark.parametrize(("text", "word"), [
    ("a red hexagon", "hexagon"), ("a crimson circle", "crimson"),
    ("a red circle near a blue square", "near"),
    ("a red circle on a teal background", "teal"), ("a red circle in the top middle", "middle"),
])
def test_parser_unknown_words_name_the_word(text, word):
    with pytest.raises(PromptError, match=word):
        parse_prompt(text)


@pytest.mark.parametrize("text", ["two red circle", "a red circles", "red circle", "a red circle above",
                                  "two red circles above a blue square", "a red circle in the top bottom"])
def test_parser_rejects_malformed(text):
    with pytest.raises(PromptError):
        parse_prompt(text)


def test_heldout_prompts_file_parses_covers_families_and_is_reproducible():
    pairs = P.heldout_prompts()
    assert pairs == P.make_heldout_prompts()  # the committed file is what the function makes
    counts = Counter(f for f, _ in pairs)
    assert counts == {f: P.HELDOUT_PER_FAMILY for f in P.FAMILIES}
    assert len({p for _, p in pairs}) == len(pairs)
    for family, prompt in pairs:
        assert family_of(prompt) == family
    paraphrased = [p for _, p in pairs if p.split()[0] in ("an", "there", "exactly") or " is " in p
                   or p.startswith(("a picture", "a drawing"))]
    assert len(paraphrased) > 50


def test_connected_components_against_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 3, size=(40, 50))
        valid = labels > 0
        comp = connected_components(labels, valid)
        for cls in (1, 2):
            ref, n = ndimage.label(labels == cls)
            ours = comp[labels == cls]
            assert len(np.unique(ours)) == n
            # same partition: each scipy label maps to exactly one of ours and back
            pairs = set(zip(ref[labels == cls].tolist(), ours.tolist(), strict=True))
            assert len(pairs) == n


def test_inputs_pil_array_tensor_agree():
    scene = sample_scene(np.random.default_rng(5))
    arr = render_array(scene)
    a, b, c = detect(arr), detect(render(scene)), detect(to_tensor(arr))
    assert a == b == c and len(a) == len(scene.objects)


def test_noise_is_not_an_object():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    assert all(d.shape is None for d in detect(noise))
    assert not judge(noise, "a red circle").ok
    assert detect(np.full((64, 64, 3), 255, np.uint8)) == []


def test_evaluate_and_grid(tmp_path):
    prompts = ["a red circle above a blue square", "three green triangles", "a red circle"]
    image = render_array(_scene(RED_CIRCLE_TOP, BLUE_SQUARE_BOTTOM))
    result = evaluate([image, image, image], prompts)
    assert result["accuracy"] == {"single": 1.0, "relation": 1.0, "counting": 0.0}
    assert result["overall"] == pytest.approx(2 / 3) and result["n"] == 3
    assert [r["ok"] for r in result["results"]] == [True, False, True]
    verdicts = [judge(image, p) for p in prompts]
    path = tmp_path / "grid.png"
    save_grid([image] * 3, prompts, verdicts, str(path), cols=2, cell=64)
    grid = np.asarray(Image.open(path).convert("RGB"))
    cw, ch = 64 + 8, 64 + 8 + 48
    assert grid.shape == (2 * ch, 2 * cw, 3)
    assert tuple(grid[1, 1]) == (30, 170, 60)  # first tile framed green
    assert tuple(grid[1, cw + 1]) == (220, 20, 20)  # second framed red
    assert (grid[64 + 8 + 2:ch, :cw] < 100).any()  # the prompt text is drawn under the tile


def test_run_shapes_eval_with_a_perfect_and_a_blank_generator(tmp_path):
    """A generator that renders a true scene for each prompt scores 1; a blank one 0."""
    pairs = [(f, p) for f, p in P.heldout_prompts()[::25]]
    truth = {}
    for k, family in enumerate(P.FAMILIES):  # recreate the scenes the held-out prompts came from
        for i in range(400):
            rng = np.random.default_rng([P.HELDOUT_SEED, k, i])
            scene = sample_scene(rng, family=family, background=None if family == "background" else "white")
            truth.setdefault(captions(scene, rng)[0], scene)

    def perfect(batch):
        return [render(truth[p]) for p in batch]

    def blank(batch):
        return [np.full((64, 64, 3), 255, np.uint8) for _ in batch]

    result = P_run(perfect, pairs, str(tmp_path))
    assert result["overall"] == 1.0 and set(result["accuracy"]) == set(P.FAMILIES)
    assert (tmp_path / "results.json").exists() and (tmp_path / "grid.png").exists()
    assert P_run(blank, pairs, None)["overall"] == 0.0


def P_run(gen, pairs, out):
    from t2i.eval.shapes_judge import run_shapes_eval

    return run_shapes_eval(gen, pairs, out, batch_size=5)
