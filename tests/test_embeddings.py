"""Textual-inversion embeddings (issue 21): files written by the test in A1111's `.pt`, kohya's
`emb_params`, diffusers' `learned_embeds` and SDXL's clip_l/clip_g forms, loaded into diffusers
(`load_textual_inversion`, the oracle) and into t2i (`load_embeddings`) on tiny random SD1 / SDXL
models: the same text-encoder output and final latents; removal restores the token embeddings bit for
bit; embeddings for another family, names that clash and pickles that want to run code are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from sd_oracles import build_sd1, build_sdxl, reference_latents

import t2i
from t2i.adapters.embeddings import EmbeddingError, load_embedding_dir, load_embeddings, read_embedding
from t2i.text.prompt_syntax import encode_prompts, prompt_chunks

TEXT_TOL = 1e-6  # max |ours - diffusers| of the text encoder's output
LATENT_TOL = 2e-4  # max |ours - diffusers| of the final latents relative to their std
WIDTH = 32  # the tiny models' CLIP width (every encoder)
PROMPT = "a red circle in my-style above a blue square"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1") / "model"
    build_sd1(folder)
    return folder, t2i.load(folder)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "model"
    build_sdxl(folder)
    return folder, t2i.load(folder)


def _diffusers(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)


def _vectors(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    """(n, width) vectors far larger than the random token embeddings (std 0.02): the prompt's output
    moves by far more than the tolerances when they are used."""
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write_a1111(path, vectors: torch.Tensor):
    """A1111's textual-inversion `.pt`, every field its trainer saves (the name inside is not the trigger)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_(True)},
                "name": "stored-name", "step": 500, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "sd1"}, path)
    return path


def _latent_error(ref, ours, prompt: str) -> float:
    """max |ours - diffusers| of the final latents over their std (3 Euler steps, guidance 5, 16x16)."""
    expected = reference_latents(ref, prompt, "euler", False, 3, 5.0, 3, 16)
    got = ours.generate(prompt, seed=3, steps=3, guidance=5.0, sampler="euler", width=16, height=16).latents
    return ((got - expected).abs().max() / expected.std()).item()


def _check(what: str, text_err: float, latent_err: float, moved: float) -> None:
    print(f"{what}: text encoder {text_err:.2e}, latents {latent_err:.2e} of their std "
          f"(the embedding moved the text encoder output by {moved:.2e})")
    assert moved > 0.1  # the embedding is used: the comparisons can fail
    assert text_err < TEXT_TOL and latent_err < LATENT_TOL


def _rows(pipe) -> list[torch.Tensor]:
    enc = pipe.text_encoder
    towers = enc.encoders if hasattr(enc, "encoders") else [enc]
    return [t.model.token_embedding.weight.detach().clone() for t in towers]


def _assert_rows(pipe, base: list[torch.Tensor]) -> None:
    now = _rows(pipe)
    assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(now, base, strict=True))


@pytest.mark.parametrize("fmt", ["a1111", "emb_params", "diffusers"])
def test_sd1_embedding_matches_diffusers(sd1, fmt, tmp_path):
    folder, ours = sd1
    ref = _diffusers(folder)
    vectors = _vectors(3 if fmt != "diffusers" else 1)
    if fmt == "a1111":
        path = write_a1111(tmp_path / "my-style.pt", vectors)
        ref.load_textual_inversion(str(path), token="my-style")
    elif fmt == "emb_params":
        path = tmp_path / "my-style.safetensors"
        save_file({"emb_params": vectors}, path)
        ref.load_textual_inversion(str(path), token="my-style")
    else:  # the token named inside the file; diffusers' single vector is (D,)
        path = tmp_path / "learned_embeds.safetensors"
        save_file({"my-style": vectors[0]}, path)
        ref.load_textual_inversion(str(path))
    base = _rows(ours)
    plain = encode_prompts(ours.text_encoder, [PROMPT]).context
    with load_embeddings(ours, [path]) as handle:
        assert handle.names == ["my-style"]
        got = encode_prompts(ours.text_encoder, [PROMPT]).context  # (1, 77, 32)
        expected = ref.encode_prompt(PROMPT, "cpu", 1, False)[0]
        text_err = (got - expected).abs().max().item()
        moved = (got - plain).abs().max().item()
        latent_err = _latent_error(ref, ours, PROMPT)
    _check(f"sd1 {fmt} ({len(vectors)} vectors)", text_err, latent_err, moved)
    _assert_rows(ours, base)
    assert torch.equal(encode_prompts(ours.text_encoder, [PROMPT]).context, plain)  # the word is plain text again


def test_sdxl_two_encoder_embedding_matches_diffusers(sdxl, tmp_path):
    folder, ours = sdxl
    ref = _diffusers(folder)
    state = {"clip_l": _vectors(2, seed=1), "clip_g": _vectors(2, seed=2)}
    path = tmp_path / "my-style.safetensors"
    save_file(state, path)
    ref.load_textual_inversion(state["clip_l"], token="my-style", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token="my-style", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    base = _rows(ours)
    plain = encode_prompts(ours.text_encoder, [PROMPT])
    with load_embeddings(ours, [path]):
        enc = encode_prompts(ours.text_encoder, [PROMPT])
        moved = min((enc.context - plain.context).abs().max().item(), (enc.pooled - plain.pooled).abs().max().item())
        context, _, pooled, _ = ref.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        text_err = max((enc.context - context).abs().max().item(), (enc.pooled - pooled).abs().max().item())
        latent_err = _latent_error(ref, ours, PROMPT)
    _check("sdxl clip_l + clip_g (2 vectors; context and pooled)", text_err, latent_err, moved)
    _assert_rows(ours, base)


def test_multi_vector_words_take_n_tokens_and_carry_emphasis(sd1, tmp_path):
    _folder, ours = sd1
    tok = ours.text_encoder.tokenizer
    plain = tok.token_ids(["a my-style b", "my-styles"])
    a = write_a1111(tmp_path / "my-style.pt", _vectors(3))
    b = write_a1111(tmp_path / "my-style-two.pt", _vectors(2, seed=1))
    with load_embeddings(ours, [a, b]):
        rows = ours.text_encoder.model.token_embedding.num_embeddings
        words = tok.words
        assert words == {"my-style": [rows - 5, rows - 4, rows - 3], "my-style-two": [rows - 2, rows - 1]}
        # Whole CLIP words only, case-insensitive, the longest name first; a word of other tokens is left alone.
        assert tok.token_ids(["a My-Style b", "my-style-two", "my-styles"]) == [
            [plain[0][0], *words["my-style"], plain[0][-1]], words["my-style-two"], plain[1]]
        assert tok.tokenize(["my-style"]).lengths.tolist() == [2 + 3]
        chunk = prompt_chunks(tok, "(my-style:1.3) my-style-two")[0]  # A1111's emphasis path
        assert chunk.tokens == words["my-style"] + words["my-style-two"]
        assert chunk.weights == [1.3] * 3 + [1.0] * 2
    assert tok.words == {}
    assert tok.token_ids(["a my-style b", "my-styles"]) == plain


def test_removing_one_of_two_keeps_the_other(sd1, tmp_path):
    _folder, ours = sd1
    base = _rows(ours)
    first = load_embeddings(ours, [write_a1111(tmp_path / "first-style.pt", _vectors(2))])
    second = load_embeddings(ours, [write_a1111(tmp_path / "second-style.pt", _vectors(3, seed=4))])
    prompt = ["a second-style square"]
    expected = encode_prompts(ours.text_encoder, prompt).context
    first.remove()  # out of order: the second's rows move down
    assert ours.text_encoder.tokenizer.words == {"second-style": [len(base[0]) + i for i in range(3)]}
    assert torch.equal(encode_prompts(ours.text_encoder, prompt).context, expected)
    second.remove()
    _assert_rows(ours, base)


def test_embeddings_for_another_family_are_refused(sd1, sdxl, tmp_path):
    _, one = sd1
    _, xl = sdxl
    base = _rows(one), _rows(xl)
    sd2_like = write_a1111(tmp_path / "wide-style.pt", _vectors(2, width=48))
    with pytest.raises(EmbeddingError, match=r"width 48 does not match .*width 32"):
        load_embeddings(one, [sd2_like])
    xl_file = tmp_path / "xl-style.safetensors"
    save_file({"clip_l": _vectors(1), "clip_g": _vectors(1, width=48)}, xl_file)
    with pytest.raises(EmbeddingError, match=r"an SDXL embedding .*clip_l 32 \+ clip_g 48.*width is 32"):
        load_embeddings(one, [xl_file])
    with pytest.raises(EmbeddingError, match=r"width clip_l 32 \+ clip_g 48 does not match .*clip_l 32 \+ clip_g 32"):
        load_embeddings(xl, [xl_file])
    with pytest.raises(EmbeddingError, match=r"a one-encoder embedding of width 48 .*clip_l 32 \+ clip_g 32"):
        load_embeddings(xl, [sd2_like])
    # A folder skips them with a warning naming each, and loads the rest.
    good = write_a1111(tmp_path / "good-style.pt", _vectors(1))
    with pytest.warns(UserWarning, match=r"2 embedding\(s\) .* skipped: .*wide-style.pt.*xl-style"):
        handle = load_embedding_dir(one, tmp_path)
    assert handle.names == ["good-style"] and len(handle.skipped) == 2
    handle.remove()
    assert good.exists()
    _assert_rows(one, base[0])
    _assert_rows(xl, base[1])


def test_clashing_names_are_refused_and_nothing_changes(sd1, tmp_path):
    _folder, ours = sd1
    base = _rows(ours)
    with pytest.raises(EmbeddingError, match=r"cat.pt: 'cat' is a word of the vocabulary.*rename"):
        load_embeddings(ours, [write_a1111(tmp_path / "cat.pt", _vectors(1))])
    (tmp_path / "b").mkdir()
    upper = write_a1111(tmp_path / "My-Style.pt", _vectors(1))
    lower = tmp_path / "b" / "my-style.safetensors"
    save_file({"emb_params": _vectors(1)}, lower)
    with pytest.raises(EmbeddingError, match=r"b/my-style.safetensors: 'my-style' tokenizes like the word 'My-Style'"):
        load_embeddings(ours, [upper, lower])
    with load_embeddings(ours, [upper]), pytest.raises(EmbeddingError, match="already added"):
        load_embeddings(ours, [lower])
    _assert_rows(ours, base)
    assert ours.text_encoder.tokenizer.words == {}


class _Payload:
    """A pickle that would create a file when loaded without weights_only."""

    def __init__(self, target) -> None:
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


def test_pickles_that_run_code_and_other_files_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil-style.pt"
    torch.save({"string_to_param": {"*": _vectors(1)}, "extra": _Payload(marker)}, evil)
    with pytest.raises(EmbeddingError, match="refused to load a pickle"):
        read_embedding(evil)
    assert not marker.exists()
    lora = tmp_path / "lora.safetensors"
    save_file({"a.lora_down.weight": torch.ones(2, 2), "a.lora_up.weight": torch.ones(2, 2)}, lora)
    with pytest.raises(EmbeddingError, match="not a textual-inversion embedding"):
        read_embedding(lora)
    with pytest.raises(EmbeddingError, match="read from .pt, .bin, .safetensors"):
        read_embedding(tmp_path / "style.png")
    nan = tmp_path / "nan-style.safetensors"
    save_file({"emb_params": torch.full((1, 4), float("nan"))}, nan)
    with pytest.raises(EmbeddingError, match="NaN"):
        read_embedding(nan)
    bin_file = tmp_path / "learned_embeds.bin"  # diffusers' pickled form: the token inside is the word
    torch.save({"<cat-toy>": _vectors(1)[0]}, bin_file)
    emb = read_embedding(bin_file)
    assert emb.name == "<cat-toy>" and emb.vectors["*"].shape == (1, WIDTH)


def test_cli_embedding_dir(sd1, tmp_path):
    from safetensors.torch import load_file

    from t2i.cli import main

    folder, ours = sd1
    embeddings = tmp_path / "embeddings"
    (embeddings / "sub").mkdir(parents=True)
    path = write_a1111(embeddings / "sub" / "ink-style.pt", _vectors(2, seed=7))
    settings = dict(seed=1, steps=2, sampler="euler", width=16, height=16, guidance=5.0)
    latents = tmp_path / "latents.safetensors"
    assert main(["generate", "a circle, ink-style", "--model", str(folder), "--embedding-dir", str(embeddings),
                 "--out", str(tmp_path / "a.png"), "--save-latents", str(latents), "--precision", "fp32", "--quiet",
                 *[f"--{k}={v}" for k, v in settings.items()]]) == 0
    got = load_file(latents)["latents"]
    with load_embeddings(ours, [path]):
        expected = ours.generate("a circle, ink-style", **settings).latents
    plain = ours.generate("a circle, ink-style", **settings).latents
    assert torch.equal(got, expected)
    assert (got - plain).abs().max() > 1e-3  # the embedding changed the image


def test_sdxl_refiner_takes_clip_g(sdxl, tmp_path):
    """A refiner has only SDXL's second encoder: it takes an SDXL embedding's clip_g vectors."""
    import copy
    from types import SimpleNamespace

    from t2i.text.encoders import SDXLTextEncoder

    _, xl = sdxl
    refiner = SimpleNamespace(name="refiner", family="sdxl",
                              text_encoder=SDXLTextEncoder([copy.deepcopy(xl.text_encoder.encoders[1])]))
    path = tmp_path / "my-style.safetensors"
    state = {"clip_l": _vectors(2, seed=1), "clip_g": _vectors(2, seed=2)}
    save_file(state, path)
    tower = refiner.text_encoder.encoders[0]
    with load_embeddings(refiner, [path]):
        ids = tower.tokenizer.words["my-style"]
        assert torch.equal(tower.model.token_embedding.weight[ids], state["clip_g"])
