"""The preview decoder (t2i.autoencoders.preview, a TAESD): shapes for f=4 and f=8, a bitwise file round trip,
a distillation run that moves it towards the VAE decoder (and resumes exactly), the pipeline and CLI
option that decodes with it, and its FLOPs against the SD VAE decoder."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import t2i
from t2i.autoencoders.kl import AUTOENCODER_KL_CONFIGS, AutoencoderKL
from t2i.autoencoders.preview import PREVIEW_DECODER_CONFIGS, PreviewDecoder, PreviewDecoderConfig
from t2i.cli import main
from t2i.imageio import to_pil
from t2i.nets.attention import Attention
from t2i.nets.resample import Upsample
from t2i.systems.shapes_ldm import VAE_PRESETS, ShapesLDM, preset_config
from t2i.train.checkpoint import latest_checkpoint, read_metadata
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.preview import PreviewTrainConfig, distill_l1, load_teacher, train_preview

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(width=8, blocks=1, final_blocks=1)


def _random(decoder: PreviewDecoder, seed: int = 0) -> PreviewDecoder:
    """Every weight random (the zero-initialised block outputs too), so every layer shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return decoder.eval()


@torch.no_grad()
def test_shapes_for_f4_and_f8_and_only_convolutions():
    z = torch.randn(2, 4, 5, 7)
    for upsamples, f in ((2, 4), (3, 8)):
        decoder = _random(PreviewDecoder(PreviewDecoderConfig(upsamples=upsamples, **TINY)))
        assert decoder.cfg.downsample_factor == f
        out = decoder(z)
        assert out.shape == (2, 3, 5 * f, 7 * f)
        assert torch.isfinite(out).all() and out.std() > 1e-3
        assert not any(isinstance(m, (nn.GroupNorm, Attention)) for m in decoder.modules())
    # for_vae takes channels, factor and latent scaling from the VAE it stands in for
    sd = PreviewDecoderConfig.for_vae(AUTOENCODER_KL_CONFIGS["sd"])
    assert (sd.upsamples, sd.latent_channels, sd.latent_scale, sd.width) == (3, 4, 0.18215, 64)
    assert PreviewDecoderConfig.for_vae(VAE_PRESETS["shapes_f4"]).upsamples == 2
    # the network reads the diffusion latent (z - shift) * scale
    scaled = _random(PreviewDecoder(PreviewDecoderConfig(upsamples=2, latent_scale=0.5, latent_shift=0.3, **TINY)))
    plain = PreviewDecoder(PreviewDecoderConfig(upsamples=2, **TINY)).eval()
    plain.load_state_dict(scaled.state_dict())
    torch.testing.assert_close(scaled(z), plain((z - 0.3) * 0.5), rtol=0, atol=0)


def test_untrained_blocks_start_as_the_identity():
    decoder = PreviewDecoder(PreviewDecoderConfig(upsamples=2, **TINY))
    block = decoder.decoder.layers[2]  # conv_in, ReLU, then the first residual block
    h = torch.rand(1, 8, 6, 6)  # non-negative, as after the input ReLU
    assert torch.equal(block(h), h)


def test_save_load_round_trip_is_bitwise(tmp_path):
    decoder = _random(PreviewDecoder(PreviewDecoderConfig(upsamples=3, latent_scale=0.18215, **TINY)))
    decoder.save(tmp_path / "preview.safetensors")
    loaded = PreviewDecoder.load(tmp_path / "preview.safetensors")
    assert loaded.cfg == decoder.cfg
    a, b = decoder.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded(z), decoder(z))
    assert not any(p.requires_grad for p in loaded.parameters())
    ShapesLDM(preset_config("tiny", "tiny")).save(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a preview decoder file .*'shapes_ldm'"):
        PreviewDecoder.load(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="preview decoder file not found"):
        PreviewDecoder.load(tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A tiny shapes-LDM file (f = 4 VAE on 16x16 images) with random weights."""
    torch.manual_seed(0)
    model = ShapesLDM(preset_config("tiny", "tiny"))
    model.cfg.vae.scaling_factor = 0.7  # the teacher's scaling must reach the preview decoder's config
    with torch.no_grad():  # a near-deterministic posterior, as a trained VAE has
        model.vae.quant_conv.bias[4:] = -12.0
        model.unet.conv_out.weight.mul_(8)  # a random tiny U-Net barely moves the latents otherwise
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    model.save(path)
    return str(path)


def _train_cfg(out, **kw) -> PreviewTrainConfig:
    # The teacher is the built-in model's trained VAE (on 16x16 images: it is convolutional): a random
    # VAE decoder is a function of noise-like detail that no small network learns in 40 steps.
    base = dict(out=str(out), model=None, decoder=PreviewDecoderConfig(width=16, blocks=1, final_blocks=1),
                image_size=16, steps=40, batch_size=8, lr=3e-3, warmup=5, ckpt_every=20, image_every=40,
                log_every=10)
    base.update(kw)
    return PreviewTrainConfig(**base)


def test_distillation_lowers_the_l1_to_the_vae_decoder_and_resumes_exactly(tmp_path):
    cfg = _train_cfg(tmp_path / "a")
    teacher = load_teacher(None)
    x, _, _ = open_data("shapes", None, 16, seed=7).batch(0, 32, DistInfo())  # not the training stream
    resolved = PreviewDecoderConfig.for_vae(teacher.cfg, width=16, blocks=1, final_blocks=1)
    torch.manual_seed(cfg.seed)  # the run's initial weights, built as train_preview builds them
    before = distill_l1(PreviewDecoder(resolved), teacher, x)
    with torch.no_grad():
        target = teacher.decode(teacher.encode(x).mode())
    mean_colour = (target - target.mean(dim=(0, 2, 3), keepdim=True)).abs().mean().item()
    assert train_preview(cfg) == 0
    trained = PreviewDecoder.load(tmp_path / "a" / "preview.safetensors")
    assert trained.cfg == resolved and trained.cfg.upsamples == 2
    after = distill_l1(trained, teacher, x)
    print(f"held-out L1 to the VAE decode: before {before:.4f} after {after:.4f} (mean colour {mean_colour:.4f})")
    assert after < 0.35 * before  # measured: 0.763 -> 0.210 (TAESD layout; the earlier layout: 0.754 -> 0.158)
    assert after < 0.4 * mean_colour  # more than the average colour: the shapes themselves (0.602)
    meta = read_metadata(latest_checkpoint(tmp_path / "a"))
    assert meta["step"] == 40 and meta["data_position"] == 40 * 8
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "preview/eval_l1" in log and "held-out L1 to the VAE decode" in log
    assert (tmp_path / "a" / "samples" / "preview_00000040.png").is_file()
    # 20 steps, then --resume to 40: the same weights as the straight run, bit for bit
    assert train_preview(_train_cfg(tmp_path / "b", steps=20)) == 0
    assert train_preview(_train_cfg(tmp_path / "b", steps=40), resume=True) == 0
    a, b = (load_file(tmp_path / run / "preview.safetensors") for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a later resume may lower the learning rate (and only that): the saved config carries it on
    assert train_preview(_train_cfg(tmp_path / "b", steps=50), resume=True, resume_lr=1e-4) == 0
    meta = read_metadata(latest_checkpoint(tmp_path / "b"))
    assert meta["step"] == 50 and meta["config"]["lr"] == 1e-4 and meta["config"]["steps"] == 50
    assert "step 50 " in (log := (tmp_path / "b" / "log.txt").read_text()) and "lr=0.0001" in log.split("step 50 ")[1]
    with pytest.raises(ValueError, match="--resume-lr only applies with --resume"):
        train_preview(_train_cfg(tmp_path / "c"), resume_lr=1e-4)
    with pytest.raises(ValueError, match="--resume-lr must be a positive learning rate, got -0.001"):
        train_preview(_train_cfg(tmp_path / "b", steps=60), resume=True, resume_lr=-1e-3)


def test_train_preview_command_writes_a_preview_decoder(tmp_path, tiny_model):
    out = tmp_path / "cli"
    code = main(["train", "preview", "--model", tiny_model, "--out", str(out), "--steps", "2", "--batch-size", "2",
                 "--image-size", "16", "--width", "8", "--blocks", "1", "--image-every", "0", "--threads", "1"])
    assert code == 0
    decoder = PreviewDecoder.load(out / "preview.safetensors")
    # the shape from the command line, the rest from the model's VAE (its scaling factor included)
    assert (decoder.cfg.width, decoder.cfg.blocks, decoder.cfg.upsamples, decoder.cfg.latent_scale) == (8, 1, 2, 0.7)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return t2i.load(tiny_model)


SETTINGS = dict(seed=3, steps=2, guidance=3.0, width=16, height=16)


def test_pipeline_preview_flag_decodes_with_the_preview_decoder(pipe):
    with pytest.raises(ValueError, match="needs a preview decoder"):
        pipe.generate("a red circle", preview=True, **SETTINGS)
    pipe.preview_decoder = PreviewDecoder(PreviewDecoderConfig(upsamples=3, **TINY))  # f = 8 on an f = 4 model
    with pytest.raises(ValueError, match="factor 8; this model's are 4 at 4"):
        pipe.generate("a red circle", preview=True, **SETTINGS)
    decoder = _random(PreviewDecoder(PreviewDecoderConfig.for_vae(pipe.vae.cfg, **TINY)))
    pipe.preview_decoder = decoder
    try:
        vae = pipe.generate("a red circle", **SETTINGS)
        fast = pipe.generate("a red circle", preview=True, **SETTINGS)
    finally:
        pipe.preview_decoder = None
    assert torch.equal(fast.latents, vae.latents)  # only the decoding differs
    with torch.no_grad():
        expected = to_pil(decoder(pipe.vae.unscale(fast.latents)))[0]
    assert fast.images[0].tobytes() == expected.tobytes()
    assert fast.images[0].tobytes() != vae.images[0].tobytes()
    assert fast.images[0].size == vae.images[0].size == (16, 16)
    assert fast.images[0].info["parameters"].endswith("Decoder: preview")
    assert "Decoder" not in vae.images[0].info["parameters"]


def test_generate_command_takes_a_preview_decoder(tmp_path, tiny_model, pipe):
    decoder = _random(PreviewDecoder(PreviewDecoderConfig.for_vae(pipe.vae.cfg, **TINY)))
    decoder.save(tmp_path / "preview.safetensors")
    args = ["generate", "a red circle", "--model", tiny_model, "--seed", "3", "--steps", "2", "--guidance", "3",
            "--width", "16", "--height", "16", "--precision", "fp32", "--quiet"]
    assert main([*args, "--preview-decoder", str(tmp_path / "preview.safetensors"),
                 "--out", str(tmp_path / "fast.png")]) == 0
    with Image.open(tmp_path / "fast.png") as im:
        assert im.info["parameters"].endswith("Decoder: preview")
        pixels = im.convert("RGB").tobytes()
    pipe.preview_decoder = decoder
    try:
        direct = pipe.generate("a red circle", preview=True, **SETTINGS).images[0]
    finally:
        pipe.preview_decoder = None
    assert pixels == direct.tobytes()
    assert main([*args, "--preview-decoder", str(tmp_path / "missing.safetensors"),
                 "--out", str(tmp_path / "x.png")]) == 2


def test_eval_shapes_judges_the_preview_decoders_images(tmp_path, tiny_model, pipe, monkeypatch):
    """`t2i eval shapes --preview-decoder` judges exactly the images generate(preview=True) makes."""
    from t2i.eval import shapes_judge

    decoder = _random(PreviewDecoder(PreviewDecoderConfig.for_vae(pipe.vae.cfg, **TINY)))
    decoder.save(tmp_path / "preview.safetensors")
    judged = []

    def fake_eval(generate, prompts, out):
        judged.extend(generate(["a red circle"]))
        return {"overall": 0.0, "n": 1, "accuracy": {}}

    monkeypatch.setattr(shapes_judge, "run_shapes_eval", fake_eval)
    assert main(["eval", "shapes", "--model", tiny_model, "--limit", "1", "--steps", "2", "--guidance", "3",
                 "--precision", "fp32", "--preview-decoder", str(tmp_path / "preview.safetensors"),
                 "--out", str(tmp_path / "eval")]) == 0
    pipe.preview_decoder = decoder
    try:
        expected = pipe.generate(["a red circle"], seed=[0], steps=2, guidance=3.0, preview=True).images[0]
    finally:
        pipe.preview_decoder = None
    assert judged[0].tobytes() == expected.tobytes()
    assert judged[0].info["parameters"].endswith("Decoder: preview")


def _flops(fn, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops()


def test_preview_decoding_of_a_64x64_latent_costs_a_fraction_of_the_sd_vae_decoder(monkeypatch):
    # Built on the meta device: FLOPs are counted from shapes, no 2.5 TFLOP computation is run.
    with torch.device("meta"):
        vae = AutoencoderKL(AUTOENCODER_KL_CONFIGS["sd"])
        preview = PreviewDecoder(dataclasses.replace(PREVIEW_DECODER_CONFIGS["sd"]))
        z = torch.empty(1, 4, 64, 64)
        assert preview(z).shape == (1, 3, 512, 512)
        vae_flops, preview_flops = _flops(vae.decode, z), _flops(preview, z)
        # the architecture's count: every upsampler as interpolate + 3x3 conv
        monkeypatch.setattr(Upsample, "PHASE_MIN_PIXELS", 2**40)
        vae_flops_plain, preview_flops_plain = _flops(vae.decode, z), _flops(preview, z)
    print(f"512x512 decode: SD VAE {vae_flops / 1e9:.0f} GFLOP, preview {preview_flops / 1e9:.0f} GFLOP")
    assert round(vae_flops_plain / 1e9) == 2515  # DESIGN.md's measured figures
    assert round(preview_flops_plain / 1e9) == 141
    # upsampling as four 2x2 phase convolutions: 4/9 of the upsamplers' 695 GFLOP
    assert round(vae_flops / 1e9) == 2128
    assert vae_flops > 15 * preview_flops
