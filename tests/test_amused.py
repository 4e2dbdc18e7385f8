"""aMUSEd / Muse: diffusers' UVit2DModel and AmusedPipeline (tiny random weights built here with
diffusers and transformers, the oracles only) load in t2i and give the same logits, the same tokens
from the same generator, and the same images; detection, and generation through `t2i.load`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import t2i
from t2i.checkpoints.diffusers_amused import (
    is_amused_folder,
    load_uvit2d,
    uvit_config_from_diffusers,
    uvit_config_to_diffusers,
)
from t2i.systems.base import GenerationRequest
from t2i.systems.registry import systems

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 2e-4  # max |ours - diffusers| relative to the std of diffusers' image
LOGIT_SCALE = 8.0  # the logits head scaled up: near-uniform logits would let a wrong step draw the same tokens


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Norm weights, GRN gamma/beta and biases away from their (1, 0) start, so that a norm applied in
    the wrong place, or a missing one, shows in the numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() <= 1 or name.endswith(("gamma", "beta")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _uvit(seed: int = 0, **kw):
    from diffusers import UVit2DModel

    torch.manual_seed(seed)
    settings = dict(hidden_size=32, use_bias=False, cond_embed_dim=24, micro_cond_encode_dim=8, micro_cond_embed_dim=40,
                    encoder_hidden_size=20, vocab_size=40, codebook_size=32, in_channels=16, block_out_channels=24,
                    num_res_blocks=2, downsample=True, upsample=True, block_num_heads=2, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=48, sample_size=4)
    net = UVit2DModel(**{**settings, **kw}).eval()
    _perturb(net, seed + 1)
    with torch.no_grad():
        net.mlm_layer.conv2.weight.mul_(LOGIT_SCALE)
    return net


@pytest.mark.parametrize("settings", [
    {},  # aMUSEd's choices: no biases, a 2x2 down/up stage (aMUSEd-512)
    {"use_bias": True, "downsample": False, "upsample": False, "block_out_channels": 32},  # no kv_mapper either
    {"ln_elementwise_affine": False, "num_res_blocks": 1},
], ids=["amused", "bias-no-resample", "no-affine"])
def test_uvit2d_logits_match_diffusers(tmp_path, settings):
    ref = _uvit(**settings)
    ref.save_pretrained(tmp_path / "transformer")
    ours = load_uvit2d(tmp_path / "transformer")
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 40, (2, 4, 6), generator=g)  # non-square grid, mask id 39 among them
    tokens[0, 0, :3] = 39
    context, pooled = torch.randn(2, 7, 20, generator=g), torch.randn(2, 24, generator=g)
    micro = torch.tensor([[48.0, 32, 0, 0, 6], [32, 32, 3, 1, 5]])
    with torch.no_grad():
        want = ref(tokens, encoder_hidden_states=context, pooled_text_emb=pooled, micro_conds=micro)
        got = ours(tokens, context, pooled, micro)
        # the micro-conditions matter: another size changes the logits
        moved = ours(tokens, context, pooled, micro + torch.tensor([16.0, 0, 0, 0, 0]))
    assert got.shape == want.shape == (2, 32, 4, 6)
    err = (got - want).abs().max().item()
    print(f"{settings}: logits max |diff| {err:.2e} (std {want.std():.2f})")
    assert err < 1e-4
    assert (moved - got).abs().max() > 0.01 * want.std()
    assert uvit_config_from_diffusers(uvit_config_to_diffusers(ours.cfg)) == ours.cfg  # the config round trip


def _tiny_amused(folder: Path, seed: int = 0):
    """A diffusers AmusedPipeline of tiny random parts, saved to `folder`: 4x4 tokens of a 32-code f=4
    VQ (16x16 images), a 2-layer CLIP with projection on the real vocabulary."""
    from diffusers import AmusedPipeline, AmusedScheduler, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from t2i.text.clip_tokenizer import CLIPTokenizer

    torch.manual_seed(seed)
    vq = VQModel(block_out_channels=[16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 3,
                 up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, latent_channels=8, norm_num_groups=8,
                 num_vq_embeddings=32, sample_size=16, mid_block_add_attention=False, lookup_from_codebook=True,
                 force_upcast=True).eval()
    _perturb(vq, seed + 2)
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(seed + 3))
    clip = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=20, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        projection_dim=24)).eval()
    CLIPTokenizer.default(pad_token="!").save(folder / "_tokenizer")
    tokenizer = HFCLIPTokenizer(str(folder / "_tokenizer" / "vocab.json"), str(folder / "_tokenizer" / "merges.txt"),
                                pad_token="!", model_max_length=77)
    pipe = AmusedPipeline(vqvae=vq, tokenizer=tokenizer, text_encoder=clip, transformer=_uvit(seed),
                          scheduler=AmusedScheduler(mask_token_id=39))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "amused")
    return pipe, folder / "amused"


@pytest.fixture(scope="module")
def amused(tmp_path_factory):
    reference, path = _tiny_amused(tmp_path_factory.mktemp("amused"))
    return reference, path, t2i.load(path)


def _reference(pipe, prompt: str, seed: int, output_type: str, **kw) -> torch.Tensor:
    out = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type, **kw).images
    return torch.as_tensor(out)


@pytest.mark.parametrize(("steps", "guidance", "negative", "size"), [
    (12, 10.0, None, (16, 16)),  # diffusers' defaults
    (5, 4.0, "blurry", (24, 16)),  # a negative prompt, a non-square image (width 24: 6x4 tokens)
    (3, 1.0, None, (16, 16)),  # no guidance: the conditional branch alone
])
def test_amused_pipeline_matches_diffusers(amused, steps, guidance, negative, size):
    reference, _, ours = amused
    prompt, seed, (width, height) = "a red circle above a blue square", 11, size
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, negative_prompt=negative, width=width,
              height=height)
    want_tokens = _reference(reference, prompt, seed, "latent", **kw)  # (1, h, w)
    want_image = _reference(reference, prompt, seed, "np", **kw).permute(0, 3, 1, 2)  # (1, 3, H, W) in [0, 1]
    result = ours.generate(prompt, negative or "", seed=seed, steps=steps, guidance=guidance, width=width,
                           height=height)
    assert result.sample.shape == want_tokens.shape == (1, height // 4, width // 4)
    assert len(want_tokens.unique()) > 4  # a real draw among many codes
    assert torch.equal(result.sample, want_tokens)
    image = (ours.decode_pixels(result.sample) + 1) / 2  # [-1, 1] -> diffusers' [0, 1]
    err = ((image - want_image).abs().max() / want_image.std()).item()
    print(f"steps {steps} guidance {guidance}: image max |diff| / std {err:.2e}")
    assert err < TOLERANCE
    assert result.images[0].size == (width, height)


def test_guidance_and_prompts_change_the_tokens(amused):
    """A test that cannot pass by accident: the prompt, the negative prompt, the guidance scale and
    the seed each change what is drawn."""
    _, _, ours = amused
    base = dict(seed=5, steps=6, guidance=10.0)

    def tokens(prompt: str = "a red circle", negative: str = "", **kw) -> torch.Tensor:
        return ours.generate(prompt, negative, **{**base, **kw}).sample

    first = tokens()
    assert torch.equal(first, tokens())
    for other in (tokens("two green triangles"), tokens(negative="blurry"), tokens(guidance=3.0), tokens(seed=6)):
        assert not torch.equal(first, other)


def test_images_do_not_depend_on_the_batch(amused):
    """Image i of seed s is the image of seed s + i alone: diffusers' tokens for that seed."""
    reference, _, ours = amused
    both = ours.generate(["a red circle", "a blue square"], ["", "blurry"], seed=[4, 9], num_images=2, steps=4)
    assert both.seeds == [4, 5, 9, 10]
    alone = ours.generate("a blue square", "blurry", seed=10, steps=4)
    assert torch.equal(both.sample[3], alone.sample[0])
    want = _reference(reference, "a red circle", 5, "latent", num_inference_steps=4)
    assert torch.equal(both.sample[1], want[0])
    assert "Seed: 10," in both.images[3].info["parameters"]
    assert not both.warnings
    long = ours.generate("a red circle " * 30, seed=1, steps=2)
    assert len(long.warnings) == 1 and "was cut" in long.warnings[0]


def test_progress_callback_and_stop(amused):
    from t2i.systems.base import Interrupted

    _, _, ours = amused
    seen, previews = [], []
    ours.generate("a red circle", seed=1, steps=5, callback=lambda i, n: seen.append((i, n)),
                  on_sample=lambda i, n, x: previews.append(x.shape))
    assert seen == [(i, 5) for i in range(1, 6)]
    assert previews == [(1, 4, 4)] * 5  # the current token estimate: what the server decodes
    calls = []
    with pytest.raises(Interrupted):
        ours.generate("a red circle", seed=1, steps=5, should_stop=lambda: calls.append(1) or len(calls) > 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        ours.generate("a red circle", width=20)


def test_detection_claims_only_amused_folders(amused, tmp_path):
    _, path, ours = amused
    assert is_amused_folder(path)
    assert [s.name for s in systems() if s.detect(path)] == ["amused"]
    assert ours.family == "amused" and ours.capabilities.native_size == (16, 16)
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert not is_amused_folder(other)


def test_write_tiny_is_read_by_diffusers_with_the_same_tokens(tmp_path):
    """t2i's own writer makes a folder diffusers loads and decodes to the same tokens and image."""
    from diffusers import AmusedPipeline

    from t2i.systems.amused import write_tiny

    path = write_tiny(tmp_path, 0)
    ours = t2i.load(path)
    reference = AmusedPipeline.from_pretrained(path)
    reference.set_progress_bar_config(disable=True)
    result = ours.generate("a red circle", seed=2, steps=4)
    want = _reference(reference, "a red circle", 2, "np", num_inference_steps=4).permute(0, 3, 1, 2)
    assert torch.equal(result.sample, _reference(reference, "a red circle", 2, "latent", num_inference_steps=4))
    assert (((ours.decode_pixels(result.sample) + 1) / 2 - want).abs().max() / want.std()).item() < TOLERANCE


@pytest.mark.parametrize(("steps", "strength", "guidance", "negative"),
                         [(12, 1.0, 10.0, None), (8, 0.5, 4.0, "blurry")])
def test_inpainting_matches_diffusers(amused, steps, strength, guidance, negative):
    """Muse-style editing: the image's tokens kept under the black part of the mask, the white part
    redrawn, as diffusers' AmusedInpaintPipeline (its own scheduler: it switches it to the linear schedule)."""
    import numpy as np
    from diffusers import AmusedInpaintPipeline, AmusedScheduler
    from PIL import Image

    reference, _, ours = amused
    parts = {**reference.components, "scheduler": AmusedScheduler(mask_token_id=39)}
    inpaint = AmusedInpaintPipeline(**parts)
    inpaint.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :7] = 255  # the left columns of tokens, one of them half covered
    mask = Image.fromarray(mask)
    prompt, seed = "a red circle", 3
    kw = dict(image=image, mask_image=mask, num_inference_steps=steps, strength=strength, guidance_scale=guidance,
              negative_prompt=negative)
    want = _reference(inpaint, prompt, seed, "latent", **kw)  # (1, 4, 4)
    calls = []
    got = ours.generate(prompt, negative or "", seed=seed, steps=steps, strength=strength, guidance=guidance,
                        init_image=image, mask=mask, callback=lambda i, n: calls.append((i, n)))
    assert torch.equal(got.sample, want)
    codes, keep = ours.edit_tokens(ours._resolve(GenerationRequest(prompt, init_image=image, mask=mask)), (4, 4))
    assert keep.view(4, 4)[:, 2:].all() and not keep.view(4, 4)[:, :2].any()  # Lanczos + 0.5: 1.75 columns -> 2
    assert torch.equal(got.sample.flatten()[keep], codes[keep])  # the black part is the image's own tokens
    assert not torch.equal(got.sample.flatten(), codes)  # ... and the white part is redrawn
    assert calls == [(i, int(steps * strength)) for i in range(1, int(steps * strength) + 1)]
    assert "Denoising strength: " in got.images[0].info["parameters"]


def test_editing_needs_an_image_and_a_mask(amused):
    from PIL import Image

    _, _, ours = amused
    image = Image.new("RGB", (16, 16))
    with pytest.raises(ValueError, match="init_image and mask"):
        ours.generate("a red circle", init_image=image)
    with pytest.raises(ValueError, match="strength"):
        ours.generate("a red circle", init_image=image, mask=image, steps=4, strength=0.1)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precisions_generate(amused, precision):
    """bf16 weights, and int8 Linear layers in the token transformer (`unet`), run end to end."""
    _, path, _ = amused
    result = t2i.load(path, precision=precision).generate("a red circle", seed=1, steps=3)
    assert result.sample.shape == (1, 4, 4) and ((result.sample >= 0) & (result.sample < 32)).all()
    assert f"Precision: {precision}" in result.images[0].info["parameters"]
