"""The layout planner (issue 17): its token format, sampling, training pairs, training and files.

The judge's parser is used here (and in planner_eval) only to check the planner's data and output;
nothing at generation time reads it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2i.data.shapes.captioning import captions, primary_with_objects
from t2i.data.shapes.datasets import default_exclude
from t2i.data.shapes.heldout import HELDOUT_PATH, make_heldout_prompts
from t2i.data.shapes.phrasings import uses_heldout_phrasing
from t2i.data.shapes.prompts import read_prompt_file
from t2i.data.shapes.sampling import sample_scene
from t2i.data.shapes.world import CANVAS, ShapeObject
from t2i.layout.planner import (
    END,
    PLANNER_PRESETS,
    LayoutPlanner,
    Plan,
    decode_tokens,
    encode_layout,
    planner_loss,
    to_layout,
)
from t2i.layout.planner_data import planner_batch, planner_pair
from t2i.layout.planner_eval import check_plan

N_PAIRS = 300


@pytest.fixture(scope="module")
def pairs():
    return [planner_pair(0, i) for i in range(N_PAIRS)]


def test_primary_with_objects_is_captions_first_and_draws_the_same():
    for i in range(200):
        rng = np.random.default_rng([5, i])
        scene = sample_scene(rng)
        expected = captions(scene, rng)[0]
        rng = np.random.default_rng([5, i])
        scene = sample_scene(rng)
        caption, objects = primary_with_objects(scene, rng)
        assert caption == expected
        assert objects and all(o in scene.objects for o in objects)


def test_heldout_file_unchanged():
    assert read_prompt_file(HELDOUT_PATH) == make_heldout_prompts()


def test_pairs_objects_obey_their_caption(pairs):
    """The target layout of each pair is exactly what its caption says, by the judge's check."""
    for p in pairs:
        verdict = check_plan(p.caption, Plan(p.background, p.objects, True))
        assert verdict.ok, (p.caption, verdict.reasons)


def test_pairs_follow_caption_order():
    """A relation caption's first-named object comes first: 'A above B' has A's centre higher."""
    seen = 0
    for i in range(400):
        p = planner_pair(1, i)
        if " above " in p.caption and "background" not in p.caption:
            a, b = p.objects
            assert a.centre[1] < b.centre[1] - 6
            assert a.shape in p.caption.split(" above ")[0] and b.shape in p.caption.split(" above ")[1]
            seen += 1
    assert seen > 5


def test_pairs_never_show_heldout_prompts_or_phrasings():
    exclude = default_exclude()
    for i in range(1500):
        c = planner_pair(2, i).caption
        assert c not in exclude and not uses_heldout_phrasing(c)


def test_pairs_are_a_function_of_seed_and_index():
    assert planner_pair(3, 17) == planner_pair(3, 17)
    assert planner_pair(3, 17) != planner_pair(4, 17)


def test_token_round_trip(pairs):
    for p in pairs:
        plan = decode_tokens(encode_layout(p.background, p.objects))
        assert plan.objects == p.objects and plan.background == p.background and plan.valid


def test_masked_decoding_is_well_formed_on_a_random_model():
    """Whatever the weights, sampling gives BOS, a background, 1-4 whole objects with the right fields,
    boxes inside the canvas, then END."""
    torch.manual_seed(0)
    model = LayoutPlanner(PLANNER_PRESETS["tiny"]).eval()
    tokens = model.sample_tokens(torch.randn(64, 7, 384), None, torch.Generator().manual_seed(1))
    counts = set()
    for seq in tokens.tolist():
        plan = decode_tokens(seq)
        n = len(plan.objects)
        counts.add(n)
        assert 1 <= n <= 4 and seq[2 + 6 * n] == END
        assert encode_layout(plan.background, plan.objects) == seq[: 3 + 6 * n]
        for o in plan.objects:
            assert o.s >= 1 and o.x >= 0 and o.y >= 0 and o.x + o.s <= CANVAS and o.y + o.s <= CANVAS
    assert len(counts) > 1  # the random model does end at different lengths


def test_plan_resamples_to_valid_layouts_and_seeds_differ():
    torch.manual_seed(0)
    model = LayoutPlanner(PLANNER_PRESETS["tiny"]).eval()
    encoder = _FakeEncoder()
    prompts = ["a red circle"] * 16
    plans = model.plan(prompts, generator=torch.Generator().manual_seed(0), tries=50, text_encoder=encoder)
    assert sum(p.valid for p in plans) >= 14  # a random model too: the masks keep most boxes apart
    again = model.plan(prompts, generator=torch.Generator().manual_seed(0), tries=50, text_encoder=encoder)
    other = model.plan(prompts, generator=torch.Generator().manual_seed(1), tries=50, text_encoder=encoder)
    assert again == plans and other != plans


class _FakeEncoder:
    """MiniLM's interface with fixed random states (tests need no model download)."""

    def encode(self, prompts):
        from t2i.text.encoders import TextEncoding

        g = torch.Generator().manual_seed(len(prompts))
        return TextEncoding(torch.randn(len(prompts), 6, 384, generator=g), None,
                            torch.ones(len(prompts), 6, dtype=torch.bool), [False] * len(prompts))


def test_to_layout():
    plan = Plan("white", [ShapeObject("circle", "red", "small", 8, 16, 12)])
    layout = to_layout(plan)
    assert layout.objects[0].phrase == "a small red circle"
    assert layout.objects[0].box == (8 / 64, 16 / 64, 20 / 64, 28 / 64)
    layout.check()


def test_tiny_training_loss_falls():
    torch.manual_seed(0)
    model = LayoutPlanner(PLANNER_PRESETS["tiny"])
    _, tokens, lengths = planner_batch(0, list(range(32)))
    context = torch.randn(32, 8, 384)  # one fixed 'caption' state per pair: the loss must fall on it
    mask = torch.ones(32, 8, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = planner_loss(model, tokens, lengths, context, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LayoutPlanner(PLANNER_PRESETS["tiny"]).eval()
    path = tmp_path / "planner.safetensors"
    model.save(path)
    loaded = LayoutPlanner.load(path)
    assert loaded.cfg == model.cfg
    _, tokens, _ = planner_batch(0, list(range(4)))
    context, mask = torch.randn(4, 5, 384), torch.ones(4, 5, dtype=torch.bool)
    assert torch.equal(model(tokens[:, :-1], context, mask), loaded(tokens[:, :-1], context, mask))


def test_load_refuses_other_files(tmp_path):
    from t2i.checkpoints.io import save_with_config

    path = tmp_path / "x.safetensors"
    save_with_config({"w": torch.zeros(1)}, path, {}, "autoencoder_kl")
    with pytest.raises(ValueError, match="layout planner"):
        LayoutPlanner.load(path)
