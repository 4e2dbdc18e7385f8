"""Teaching the layout model a new shape word (issue 21, `t2i.train.new_word`) on the tiny layout model:
the files load, the planner's new token is chosen for captions naming the word and not for the old
ones, and the renderer LoRA changes the image of the new word's layout."""

import shutil

import pytest
import torch

import t2i
from t2i.layout.planner import VOCAB, LayoutPlanner, decode_tokens, encode_layout, text_states
from t2i.layout.spec import Layout, LayoutObject
from t2i.systems.shapes_layout import LAYOUT_MODEL_DIR, write_tiny_model
from t2i.train.new_word import PLANNER_SUFFIX, NewWordConfig, adapt, apply_new_word, planner_example


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_new_shape_tokens_round_trip():
    objects = planner_example(21, 0, "ring", 1.0)[1]
    assert VOCAB in objects  # the learnt id of the first (and only) new shape
    plan = decode_tokens(objects, ("ring",))
    assert plan.objects[0].shape == "ring"
    assert encode_layout(plan.background, plan.objects, ("ring",)) == objects


def ring_probability(planner: LayoutPlanner, captions: list[str]) -> float:
    """Mean probability of the new shape token at the first object's shape slot (teacher-forced on each
    caption's own first colour)."""
    tokens = torch.tensor([t[:3] for _, t in captions])  # BOS, background, colour
    with torch.no_grad():
        logits = planner(tokens, *text_states(planner.text_encoder(), [c for c, _ in captions]))[:, -1]
    return float(torch.softmax(logits, -1)[:, VOCAB].mean())


def test_new_word_adapter_trains_loads_and_changes_only_the_new_word(tmp_path):
    # the tiny renderer with the shipped planner: a random planner's states do not tell 'ring' from 'circle'
    write_tiny_model(tmp_path / "model")
    shutil.copyfile(LAYOUT_MODEL_DIR / "planner.safetensors", tmp_path / "model" / "planner.safetensors")
    pipe = t2i.load(str(tmp_path / "model"))
    cfg = NewWordConfig(planner_steps=30, planner_batch=16, planner_lr=0.1, renderer_steps=3, renderer_batch=2,
                        renderer_lr=1e-2)
    report = adapt(pipe, cfg, tmp_path / "out", log=lambda _: None)
    assert report["planner_loss"][1] < report["planner_loss"][0]
    lora_file = tmp_path / "out" / "ring.safetensors"
    assert (tmp_path / "out" / f"ring{PLANNER_SUFFIX}").is_file()

    base = t2i.load(str(tmp_path / "model"))
    adapted = t2i.load(str(tmp_path / "model"))
    apply_new_word(adapted, lora_file)  # strict: every LoRA key matches a layer
    assert adapted.planner.new_shapes == ("ring",)
    torch.testing.assert_close(adapted.planner.new_token, pipe.planner.new_token)

    # the planner: the new token is likely where the caption names the word, unlikely where it does not
    held = range(100_000, 100_032)  # pairs the training did not see
    rings = [planner_example(cfg.seed, i, "ring", 1.0) for i in held]
    old = [planner_example(cfg.seed, i, "ring", 0.0) for i in held]
    p_ring, p_old = ring_probability(adapted.planner, rings), ring_probability(adapted.planner, old)
    assert p_ring > 0.5 and p_old < 0.1, (p_ring, p_old)

    # the renderer: the LoRA changes the image of a ring's layout
    layout = Layout((LayoutObject("a red ring", (0.25, 0.25, 0.75, 0.75)),), "white")
    before = base.generate("a red ring", seed=0, layout=layout).latents
    after = adapted.generate("a red ring", seed=0, layout=layout).latents
    assert float((after - before).abs().mean() / before.std()) > 1e-3

    # an old-word caption's planned objects (colour, shape) are the base planner's (sizes and boxes are other
    # draws: the sampler draws from one more category)
    for prompt in ("a red circle above a blue square", "two green triangles", "a small yellow cross"):
        for seed in range(4):
            phrases = [[o.phrase.split()[-2:] for o in p.planned_layout(prompt, seed).objects] for p in (base, adapted)]
            assert phrases[0] == phrases[1], (prompt, seed, phrases)
