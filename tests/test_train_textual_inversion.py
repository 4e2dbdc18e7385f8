"""`t2i train textual-inversion` (issue 21): a word's vectors trained on a tiny random SD1 model and a
tiny captioned folder; the loss at fixed noise falls from the init word's; the written file loads through
t2i's loader (`load_embeddings`, by its stem) and through diffusers' `load_textual_inversion` (the oracle)
with the same text-encoder output, which is also what the training hook computed; resume is exact;
captions whose tokens lose the word, and vocabulary words as tokens, are refused by name."""

from __future__ import annotations

import pytest
import torch
from captioned_folder import write_captioned_folder
from safetensors.torch import load_file
from test_train_lora import frozen

import t2i
from t2i.adapters.embeddings import load_embeddings
from t2i.cli import main
from t2i.text.prompt_syntax import encode_prompts
from t2i.train.textual_inversion import LearnedWord, with_token

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "<my-thing>"
TEXT_TOL = 1e-6
PROMPT = f"a {TOKEN} above a blue square"


def train(model, data, out, *extra: str):
    args = ["train", "textual-inversion", "--model", str(model), "--data", "folder", "--data-path", str(data),
            "--out", str(out), "--token", TOKEN, "--init-word", "square", "--vectors", "2", "--image-every", "0",
            "--batch-size", "2", *extra]
    assert main(args) == 0
    return out / f"{TOKEN}.safetensors"


@pytest.fixture(scope="module")
def trained(sd1_folder, tmp_path_factory):
    model, data = sd1_folder
    return train(model, data, tmp_path_factory.mktemp("run"), "--steps", "40", "--lr", "5e-2")


def test_loss_falls_from_the_init_word(sd1_folder, trained):
    model, data = sd1_folder
    f = frozen(model, data)
    word = LearnedWord(f.pipe.text_encoder, TOKEN, 2, "square")  # the run's starting point

    def encode(captions):
        return f.pipe.text_encoder.encode([with_token(c, TOKEN) for c in captions])

    before = f.fixed_loss(encode)
    with torch.no_grad():
        word.vectors.copy_(load_file(trained)["emb_params"])
    after = f.fixed_loss(encode)
    print(f"loss at fixed noise on the 4 images: {before:.4f} -> {after:.4f}")
    # A word moves only the cross-attention context, which sways this tiny random U-Net little: the loss
    # plateaus 4.6% down (6.64 -> 6.34 at lr 5e-2 and 2e-1, 40 or 80 steps); untrained it stays put.
    assert after < 0.97 * before


def test_file_loads_in_t2i_and_diffusers_alike(sd1_folder, trained):
    from diffusers import DiffusionPipeline

    model, _ = sd1_folder
    assert set(load_file(trained)) == {"emb_params"} and load_file(trained)["emb_params"].shape == (2, 32)
    ref = DiffusionPipeline.from_pretrained(model)
    ref.load_textual_inversion(str(trained), token=TOKEN)
    expected = ref.encode_prompt(PROMPT, "cpu", 1, False)[0]  # (1, 77, 32)

    ours, hooked = t2i.load(model), t2i.load(model)
    plain = encode_prompts(ours.text_encoder, [PROMPT]).context
    with load_embeddings(ours, [trained]) as handle:
        assert handle.names == [TOKEN]  # the file's stem is the word
        got = encode_prompts(ours.text_encoder, [PROMPT]).context
    word = LearnedWord(hooked.text_encoder, TOKEN, 2, "square")
    with torch.no_grad():
        word.vectors.copy_(load_file(trained)["emb_params"])
    in_training = encode_prompts(hooked.text_encoder, [PROMPT]).context
    err, hook_err = (got - expected).abs().max().item(), (in_training - got).abs().max().item()
    moved = (got - plain).abs().max().item()
    print(f"text encoder: t2i vs diffusers {err:.2e}, training hook vs loader {hook_err:.2e} (moved {moved:.2e})")
    assert moved > 1e-2  # the word is used: the comparisons can fail
    assert err < TEXT_TOL and hook_err < TEXT_TOL


def test_resume_is_exact(sd1_folder, tmp_path):
    model, data = sd1_folder
    straight = train(model, data, tmp_path / "a", "--steps", "6", "--lr", "5e-2", "--ckpt-every", "3")
    train(model, data, tmp_path / "b", "--steps", "3", "--lr", "5e-2", "--ckpt-every", "3")
    resumed = train(model, data, tmp_path / "b", "--steps", "6", "--resume")
    a, b = load_file(straight)["emb_params"], load_file(resumed)["emb_params"]
    assert torch.equal(a, b)


@pytest.mark.parametrize(("token", "caption", "message"), [
    ("square", "a red square", "a word of the vocabulary"),
    (TOKEN, f"a {TOKEN}, red", "does not hold the word's tokens"),
])
def test_bad_tokens_and_captions_are_named(sd1_folder, tmp_path, capsys, token, caption, message):
    model, _ = sd1_folder
    data = tmp_path / "data"
    write_captioned_folder(data)
    for txt in data.glob("*.txt"):
        txt.write_text(caption)
    args = ["train", "textual-inversion", "--model", str(model), "--data", "folder", "--data-path", str(data),
            "--out", str(tmp_path / "run"), "--token", token, "--steps", "1"]
    assert main(args) != 0
    assert message in capsys.readouterr().err


def test_a_minilm_word_trains_on_the_shapes_model_and_loads_back(tmp_path, capsys):
    """The shapes models' MiniLM takes a word too (one vector): trained through fit, the file read back with
    `add_learned_word` gives the text-encoder output the training hook computed; the loss at fixed noise falls."""
    from t2i.systems.shapes_ldm import write_tiny_model
    from t2i.train.textual_inversion import add_learned_word

    model = write_tiny_model(tmp_path / "shapes")
    data = write_captioned_folder(tmp_path / "data")
    args = ["train", "textual-inversion", "--model", str(model), "--data", "folder", "--data-path", str(data),
            "--out", str(tmp_path / "run"), "--token", TOKEN, "--init-word", "square", "--image-every", "0",
            "--batch-size", "2", "--steps", "30", "--lr", "5e-2"]
    assert main(args) == 0
    vectors = load_file(tmp_path / "run" / f"{TOKEN}.safetensors")["emb_params"]
    assert vectors.shape == (1, 384)

    f = frozen(model, data)
    word = LearnedWord(f.pipe.text_encoder, TOKEN, 1, "square")  # the run's starting point

    def encode(captions):
        return f.pipe.text_encoder.encode([with_token(c, TOKEN) for c in captions])

    before = f.fixed_loss(encode)
    start = encode([PROMPT]).context
    with torch.no_grad():
        word.vectors.copy_(vectors)
    after, in_training = f.fixed_loss(encode), encode([PROMPT]).context
    loaded = t2i.load(model)
    add_learned_word(loaded.text_encoder, TOKEN, vectors)
    got = loaded.text_encoder.encode([PROMPT]).context
    err, moved = (got - in_training).abs().max().item(), (in_training - start).abs().max().item()
    print(f"MiniLM word: loss at fixed noise {before:.4f} -> {after:.4f}; loader vs hook {err:.2e} (moved {moved:.2e})")
    assert moved > 1e-2 and err < TEXT_TOL
    # The tiny random U-Net's cross-attention sways its output little: 1.09724 -> 1.09701 after 30 steps.
    assert after < before

    with pytest.raises(ValueError, match="one token of MiniLM's vocabulary"):
        add_learned_word(loaded.text_encoder, "square", vectors)
    with pytest.raises(ValueError, match="one vector"):
        add_learned_word(loaded.text_encoder, "<two>", torch.zeros(2, 384))


def test_sdxl_word_is_learned_in_both_encoders_and_loads_in_diffusers_alike(tmp_path):
    """SDXL: the word's vectors in both towers, written as `clip_l` / `clip_g`; diffusers, given each to its
    encoder (`load_textual_inversion(..., text_encoder=, tokenizer=)`), encodes the prompt as t2i does."""
    from diffusers import DiffusionPipeline
    from sd_oracles import build_sdxl

    build_sdxl(tmp_path / "model")
    data = write_captioned_folder(tmp_path / "data")
    path = train(tmp_path / "model", data, tmp_path / "run", "--steps", "6", "--lr", "5e-2")
    state = load_file(path)
    assert set(state) == {"clip_l", "clip_g"} and state["clip_l"].shape[0] == state["clip_g"].shape[0] == 2

    ref = DiffusionPipeline.from_pretrained(tmp_path / "model")
    for key, encoder, tokenizer in (("clip_l", ref.text_encoder, ref.tokenizer),
                                    ("clip_g", ref.text_encoder_2, ref.tokenizer_2)):
        ref.load_textual_inversion(state[key], token=TOKEN, text_encoder=encoder, tokenizer=tokenizer)
    context, _, pooled, _ = ref.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    ours, init = t2i.load(tmp_path / "model"), t2i.load(tmp_path / "model")
    with load_embeddings(ours, [path]):
        got = encode_prompts(ours.text_encoder, [PROMPT])
    from t2i.train.textual_inversion import learned_words

    learned_words(init.text_encoder, TOKEN, 2, "square")  # the run's starting point
    start = encode_prompts(init.text_encoder, [PROMPT])
    err = max((got.context - context).abs().max().item(), (got.pooled - pooled).abs().max().item())
    moved = min((got.context - start.context).abs().max().item(), (got.pooled - start.pooled).abs().max().item())
    print(f"SDXL word: t2i vs diffusers {err:.2e} (training moved context and pooled by at least {moved:.2e})")
    assert moved > 1e-3  # both towers' vectors trained: the comparison can fail
    assert err < TEXT_TOL
