"""The PixArt family: parity with diffusers' PixArtAlphaPipeline on a tiny random folder built and saved by
the test (a Unigram T5 tokenizer and T5EncoderModel, PixArtTransformer2DModel with learned variance, an
AutoencoderKL, DPM-Solver++), the transformer alone with a padding mask and with PixArt's micro-conditions,
and t2i's own PixArt file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import t2i
from t2i.checkpoints.diffusers_pixart import pixart_config_from_diffusers
from t2i.nets.dit import DIT_PRESETS, DiT
from t2i.systems.pixart import PixArtPipeline
from t2i.systems.registry import resolve, systems

pytestmark = pytest.mark.usefixtures("one_thread")

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

OUTPUT_SCALE = 8.0  # as tests/test_dit.py: a random network barely moves the sample otherwise
CORPUS = ["a red circle above a blue square", "two green triangles next to each other",
          "the small yellow star left of a big purple hexagon", "an orange ring below three white dots"]


def _tokenizer(folder) -> None:
    """A T5 tokenizer as transformers saves one: a Unigram model trained on CORPUS (tokenizers library)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])
    trainer = trainers.UnigramTrainer(vocab_size=80, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(CORPUS * 4, trainer)
    return transformers.T5Tokenizer(tokenizer_object=tok)


def _randomize(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Every weight random and away from its init (zero-initialised and unit norm layers included)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p + scale * torch.randn_like(p))


def _transformer(**kwargs):
    """A tiny PixArtTransformer2DModel: 2 layers of width 48 (2 heads of 24), patch 2 on 8x8 latents,
    learned variance, 32-wide captions; output projection x OUTPUT_SCALE."""
    cfg = {"num_attention_heads": 2, "attention_head_dim": 24, "in_channels": 4, "out_channels": 8, "num_layers": 2,
           "sample_size": 8, "patch_size": 2, "caption_channels": 32, "cross_attention_dim": 48,
           "use_additional_conditions": False, **kwargs}
    tr = diffusers.PixArtTransformer2DModel(**cfg)
    _randomize(tr)
    with torch.no_grad():
        tr.proj_out.weight.mul_(OUTPUT_SCALE)
        tr.proj_out.bias.mul_(OUTPUT_SCALE)
    return tr.eval()


@pytest.fixture(scope="module")
def diffusers_pixart(tmp_path_factory):
    """(folder, the diffusers PixArtAlphaPipeline loaded back from it)."""
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=80, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
        relative_attention_max_distance=20, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    _randomize(t5, 0.3)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear")
    folder = tmp_path_factory.mktemp("pixart") / "pixart-tiny"
    diffusers.PixArtAlphaPipeline(_tokenizer(folder), t5, vae, _transformer(), scheduler).save_pretrained(folder)
    pipe = diffusers.PixArtAlphaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe


def _relative(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / ref.std())


def test_the_folder_is_detected_as_pixart_only(diffusers_pixart):
    folder, _ = diffusers_pixart
    assert resolve(folder)[0].name == "pixart"
    assert [s.name for s in systems() if s.detect(folder)] == ["pixart"]
    pipe = t2i.load(folder)
    assert isinstance(pipe, PixArtPipeline) and pipe.unet.cfg.learn_sigma and pipe.unet.cfg.adaln == "single"
    caps = pipe.capabilities
    assert caps.native_size == (16, 16) and caps.size_multiple == 4 and not caps.accepts("deepcache")
    assert pipe.defaults.sampler == "dpmpp_2m" and pipe.defaults.steps == 20 and pipe.defaults.guidance == 4.5
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe.generate("a red circle", width=18, height=16, steps=1)


def test_the_transformer_output_equals_diffusers_with_a_padding_mask(diffusers_pixart):
    """One call, both output halves; the second caption's padding masked out, as the pipeline does."""
    folder, ref = diffusers_pixart
    net = t2i.load(folder).unet
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    t = torch.tensor([999, 10])
    with torch.no_grad():
        want = ref.transformer(x, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=t).sample
        got = net(x, t, context=context, mask=mask.bool())
        unmasked = net(x, t, context=context)
    assert got.shape == want.shape == (2, 8, 8, 8)
    assert _relative(got, want) < 1e-5
    assert _relative(unmasked[1], want[1]) > 1e-3  # the mask matters at this scale


def test_micro_conditions_equal_diffusers():
    """use_additional_conditions: resolution (h, w) and aspect ratio embedded into the timestep
    embedding (PixArt's 1024 px models); a 16x16 grid also exercises interpolation_scale 2."""
    torch.manual_seed(3)
    ref = _transformer(use_additional_conditions=True, sample_size=16, interpolation_scale=2)
    cfg = pixart_config_from_diffusers(dict(ref.config))
    assert cfg.micro_conditions and cfg.pos_scale == 2.0
    from t2i.checkpoints.diffusers_pixart import pixart_state_dict_from_diffusers

    net = DiT(cfg)
    net.load_state_dict(pixart_state_dict_from_diffusers(ref.state_dict()))
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 32, generator=g)
    size, aspect = torch.tensor([[512.0, 768.0], [1024.0, 1024.0]]), torch.tensor([[512 / 768], [1.0]])
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=context, timestep=torch.tensor([500, 20]),
                   added_cond_kwargs={"resolution": size, "aspect_ratio": aspect}).sample
        got = net(x, torch.tensor([500, 20]), context=context, resolution=size, aspect_ratio=aspect)
        other = net(x, torch.tensor([500, 20]), context=context, resolution=size.flip(1), aspect_ratio=1 / aspect)
    assert _relative(got, want) < 1e-5
    assert _relative(other, want) > 1e-3


def _diffusers_latents(pipe, prompt: str, **kwargs) -> torch.Tensor:
    return pipe(prompt, output_type="latent", clean_caption=False, use_resolution_binning=False, **kwargs).images


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_dpmpp_2m_final_latents_equal_diffusers_pixart_pipeline(diffusers_pixart, guidance):
    """DPM-Solver++ 10 steps with and without guidance (the empty negative prompt encoded by T5, padding
    masked): the same final latents from the same seed; the prompt is lower-cased first, as diffusers does.
    Measured: 1.6e-6 and 3.0e-6 of the std."""
    folder, ref = diffusers_pixart
    ours = t2i.load(folder).generate("A red circle above a blue square ", seed=7, steps=10, guidance=guidance)
    want = _diffusers_latents(ref, "A red circle above a blue square ", guidance_scale=guidance,
                              num_inference_steps=10, generator=torch.Generator("cpu").manual_seed(7))
    rel = _relative(ours.sample, want)
    print(f"guidance {guidance}: latents {rel:.2e} of the std")
    assert rel < 2e-4
    other = t2i.load(folder).generate("two green triangles", seed=7, steps=10, guidance=guidance).sample
    assert _relative(other, want) > 1e-2  # the prompt matters at this scale


def test_ddim_with_a_negative_prompt_equals_diffusers(diffusers_pixart):
    """Another scheduler from the folder's config (DDIM), a non-empty negative prompt. Measured: 3.2e-5."""
    folder, ref = diffusers_pixart
    ddim = diffusers.PixArtAlphaPipeline(ref.tokenizer, ref.text_encoder, ref.vae, ref.transformer,
                                         diffusers.DDIMScheduler.from_config(ref.scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    want = _diffusers_latents(ddim, "a red circle", negative_prompt="a blue square", guidance_scale=3.0,
                              num_inference_steps=8, generator=torch.Generator("cpu").manual_seed(2))
    ours = t2i.load(folder).generate("a red circle", "a blue square", seed=2, steps=8, guidance=3.0, sampler="ddim")
    rel = _relative(ours.sample, want)
    print(f"ddim: latents {rel:.2e} of the std")
    assert rel < 2e-4


def test_unsupported_transformer_configs_are_refused():
    base = {"num_attention_heads": 2, "attention_head_dim": 24, "caption_channels": 32, "cross_attention_dim": 48}
    assert pixart_config_from_diffusers(base).width == 48
    for bad, match in (({"norm_type": "ada_norm_zero"}, "norm_type"), ({"caption_channels": None}, "caption"),
                       ({"cross_attention_dim": 64}, "cross_attention_dim")):
        with pytest.raises(ValueError, match=match):
            pixart_config_from_diffusers({**base, **bad})


def test_a_new_pixart_starts_at_zero_with_random_adaln_single_tables():
    """PixArt's init: the final layer and every cross-attention output projection zero (the output is 0),
    the per-block scale_shift_tables random (not the identity gates of adaLN-Zero)."""
    net = DiT(DIT_PRESETS["pixart_tiny"])
    out = net(torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), context=torch.randn(2, 3, 32))
    assert out.shape == (2, 8, 8, 8) and not out.abs().max()  # eps and the variance values
    assert all(not b.cross_attn.to_out[0].weight.abs().max() for b in net.blocks)
    assert all(b.scale_shift_table.std() > 0.05 for b in net.blocks)
    assert not hasattr(net.blocks[0], "ada") and net.class_embed is None


def test_bf16_weights_generate_close_to_fp32(diffusers_pixart):
    """bf16 transformer weights: the text states, size inputs and latents cast on the way in, the mask kept."""
    folder, _ = diffusers_pixart
    full = t2i.load(folder).generate("a red circle", seed=1, steps=4, guidance=2.0).sample
    half = t2i.load(folder, precision="bf16").generate("a red circle", seed=1, steps=4, guidance=2.0).sample
    assert half.dtype == torch.float32 and 0 < _relative(half, full) < 0.2
