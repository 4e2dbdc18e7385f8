"""`t2i train lora` on the layout model (issue 21, `t2i.train.new_word`), on the tiny layout renderer with the
shipped planner: the LoRA trains with each scene's layout (its layout-input layer learns), `--new-word` trains
the planner's new token in the same run (chosen for captions naming the word, not for the old ones), the
files load, the LoRA changes the new word's image, `--resume` ends on the same bits, the distillation replay
starts at zero, and data without layouts is refused."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

import t2i
from t2i.adapters.lora import read_lora
from t2i.cli import main
from t2i.layout.planner import VOCAB, LayoutPlanner, decode_tokens, encode_layout, text_states
from t2i.layout.spec import Layout, LayoutObject
from t2i.systems.shapes_layout import LAYOUT_MODEL_DIR, write_tiny_model
from t2i.train.new_word import PLANNER_SUFFIX, apply_new_word, planner_example

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny renderer with the shipped planner: a random planner's states do not tell 'ring' from 'circle'."""
    folder = tmp_path_factory.mktemp("layout") / "model"
    write_tiny_model(folder)
    shutil.copyfile(LAYOUT_MODEL_DIR / "planner.safetensors", folder / "planner.safetensors")
    return folder


def train(model, out, *extra: str) -> None:
    args = ["train", "lora", "--model", str(model), "--data", "shapes", "--out", str(out), "--image-every", "0",
            "--log-every", "1", "--batch-size", "2", "--lr", "1e-2", *extra]
    assert main(args) == 0


def logged(out, key: str) -> list[float]:
    return [float(part.split("=")[1]) for line in (out / "log.txt").read_text().splitlines()
            for part in line.split() if part.startswith(key + "=")]


def test_new_shape_tokens_round_trip():
    objects = planner_example(21, 0, "ring", 1.0)[1]
    assert VOCAB in objects  # the learnt id of the first (and only) new shape
    plan = decode_tokens(objects, ("ring",))
    assert plan.objects[0].shape == "ring"
    assert encode_layout(plan.background, plan.objects, ("ring",)) == objects


def ring_probability(planner: LayoutPlanner, captions: list[tuple[str, list[int]]]) -> float:
    """Mean probability of the new shape token at the first object's shape slot (teacher-forced on each
    caption's own first colour)."""
    tokens = torch.tensor([t[:3] for _, t in captions])  # BOS, background, colour
    with torch.no_grad():
        logits = planner(tokens, *text_states(planner.text_encoder(), [c for c, _ in captions]))[:, -1]
    return float(torch.softmax(logits, -1)[:, VOCAB].mean())


def test_the_lora_learns_from_layouts(model, tmp_path):
    """The layout input layer gets a LoRA that only a forward with a layout reaches: it moves from zero
    (trained without layouts, as `t2i train lora` did before, its up matrix stayed exactly zero)."""
    train(model, tmp_path / "run", "--steps", "3", "--unet-targets", "to_q,layout_in")
    layers, _ = read_lora(tmp_path / "run" / "lora.safetensors")
    layout_in = [v for k, v in layers.items() if k.endswith("layout_in")]
    assert len(layout_in) == 1 and layout_in[0].up.abs().max() > 0


def test_new_word_trains_in_one_run_loads_and_changes_only_the_new_word(model, tmp_path):
    out = tmp_path / "run"
    train(model, out, "--new-word", "ring", "--name", "ring", "--steps", "30", "--planner-steps", "30",
          "--planner-batch", "16", "--planner-lr", "0.1", "--replay", "2", "--unet-targets", "to_q,to_v,layout_in")
    planner_losses = logged(out, "lora/planner_loss")
    assert len(planner_losses) == 30 and planner_losses[-1] < planner_losses[0]
    assert (out / f"ring{PLANNER_SUFFIX}").is_file()

    base, adapted = t2i.load(str(model)), t2i.load(str(model))
    apply_new_word(adapted, out / "ring.safetensors")  # strict: every LoRA key matches a layer
    assert adapted.planner.new_shapes == ("ring",)

    # the planner: the new token is likely where the caption names the word, unlikely where it does not
    held = range(100_000, 100_032)  # pairs the training did not see
    rings = [planner_example(0, i, "ring", 1.0) for i in held]
    old = [planner_example(0, i, "ring", 0.0) for i in held]
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


def test_resume_is_exact_for_the_lora_and_the_planner_rows(model, tmp_path):
    common = ("--new-word", "ring", "--planner-steps", "3", "--planner-batch", "4", "--replay", "1",
              "--pixel-weight", "0.3", "--pixel-batch", "2", "--ckpt-every", "2", "--unet-targets", "to_q,layout_in")
    train(model, tmp_path / "a", "--steps", "4", *common)
    train(model, tmp_path / "b", "--steps", "2", *common)
    train(model, tmp_path / "b", "--steps", "4", "--resume")
    for name in ("lora.safetensors", f"lora{PLANNER_SUFFIX}"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(v.abs().max() > 0 for k, v in load_file(tmp_path / "a" / "lora.safetensors").items() if "lora_up" in k)


def test_distillation_replay_starts_at_the_base(model, tmp_path):
    """`--replay-target base`: the replayed scenes' target is the frozen model's prediction, which the LoRA
    (up = 0) reproduces exactly at the first step; it grows only as the LoRA moves."""
    out = tmp_path / "run"
    train(model, out, "--steps", "3", "--replay", "2", "--replay-target", "base", "--unet-targets", "to_q,to_v")
    replay = logged(out, "lora/replay_loss")
    assert replay[0] == 0.0 and replay[-1] > 0.0, replay


def test_data_without_layouts_is_refused(model, tmp_path, capsys):
    from captioned_folder import write_captioned_folder

    data = write_captioned_folder(tmp_path / "data")
    args = ["train", "lora", "--model", str(model), "--data", "folder", "--data-path", str(data), "--out",
            str(tmp_path / "run")]
    assert main(args) != 0
    assert "--data shapes" in capsys.readouterr().err
    from t2i.systems.shapes_ldm import write_tiny_model as write_tiny_ldm

    plain = write_tiny_ldm(tmp_path / "ldm")  # a model without layouts: the new word's options are refused
    assert main([*args[:3], str(plain), *args[4:], "--new-word", "ring"]) != 0
    assert "layout model" in capsys.readouterr().err
