"""The DDPM family: parity with diffusers' DDPMPipeline / DDIMPipeline on a tiny random UNet2DModel
saved by diffusers, IDDPM respacing, the text-conditional network, and training that learns."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

import t2i
from t2i.checkpoints.diffusers_ddpm import pixel_unet_config_from_diffusers
from t2i.diffusion.schedules import respace_timesteps
from t2i.nets.pixel_unet import PixelUNet, PixelUNetConfig
from t2i.systems.ddpm import DDPMPipeline, ddpm_schedule
from t2i.systems.registry import resolve
from t2i.text.encoders import TextEncoding
from t2i.train.ddpm import DDPMTrainConfig, train_ddpm

pytestmark = pytest.mark.usefixtures("one_thread")

OUTPUT_SCALE = 8.0  # as tests/sd_oracles.py: a random U-Net barely moves the sample otherwise


def tiny_unet2d(out_channels: int = 3):
    """A tiny random diffusers UNet2DModel (seed 0; 16x16, self-attention at the lower level) whose first
    three output channels (eps) are scaled x8; a 6-channel (learned-variance) model's variance half is left
    as it is (its values, up to ~1.6, already span more than [beta~_t, beta_t]; x8 would overflow exp)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=out_channels, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    with torch.no_grad():
        unet.conv_out.weight[:3].mul_(OUTPUT_SCALE)
        unet.conv_out.bias[:3].mul_(OUTPUT_SCALE)
    return unet


@pytest.fixture(scope="module")
def diffusers_ddpm(tmp_path_factory):
    """(folder, the diffusers DDPMPipeline): `tiny_unet2d` with the default DDPMScheduler (linear betas,
    clip_sample, leading)."""
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet2d()
    pipe = diffusers.DDPMPipeline(unet, diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("ddpm") / "ddpm-tiny"
    pipe.save_pretrained(folder)
    return folder, pipe


def _images(sample: torch.Tensor) -> np.ndarray:
    """t2i's final sample (N, 3, H, W) in [-1, 1] -> diffusers' output_type="np" (N, H, W, 3) in [0, 1]."""
    return (sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _relative(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / ref.std())


def test_the_diffusers_folder_is_detected_as_ddpm_and_has_no_text_options(diffusers_ddpm):
    folder, _ = diffusers_ddpm
    assert resolve(folder)[0].name == "ddpm"
    pipe = t2i.load(folder)
    assert isinstance(pipe, DDPMPipeline) and not pipe.capabilities.accepts("guidance")
    assert pipe.capabilities.native_size == (16, 16)


def test_ddpm_final_images_equal_diffusers_ddpm_pipeline(diffusers_ddpm):
    """Ancestral sampling, 20 of 1000 steps (diffusers' leading spacing), x0 clipped: the same images from
    the same seed (one CPU generator for the start noise and every step's noise); image i of a batch
    is the one diffusers draws from seed + i. Measured: 1.9e-5 of the std."""
    folder, pipe = diffusers_ddpm
    ours = t2i.load(folder).generate("", seed=3, num_images=2, steps=20, sampler="ddpm")
    for i in range(2):
        ref = pipe(generator=torch.Generator("cpu").manual_seed(3 + i), num_inference_steps=20, output_type="np").images
        assert _relative(_images(ours.sample[i : i + 1]), ref) < 2e-4


def test_ddim_final_images_equal_diffusers_ddim_pipeline_on_the_same_folder(diffusers_ddpm):
    """DDIMScheduler.from_config of the folder's DDPM config (clip_sample, leading, set_alpha_to_one).
    10 steps: this x8 random network's ODE amplifies float32 rounding with more steps (diffusers
    against itself with the start noise changed by 1e-6 relative: 9e-5 of the std at 10 and 20
    steps, 1e-2 at 50), so only a short run can be compared at 2e-4. Measured: 6e-5."""
    diffusers = pytest.importorskip("diffusers")
    folder, pipe = diffusers_ddpm
    ddim = diffusers.DDIMPipeline(pipe.unet, diffusers.DDIMScheduler.from_config(pipe.scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    ref = ddim(generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=10, output_type="np").images
    ours = t2i.load(folder).generate("", seed=0, steps=10, sampler="ddim")
    assert _relative(_images(ours.sample), ref) < 2e-4
    # and the sampler matters at this scale: DDPM's images from the same seed are far from DDIM's
    other = t2i.load(folder).generate("", seed=0, steps=10, sampler="ddpm")
    assert _relative(_images(other.sample), ref) > 1e-2


def test_unsupported_unet2dmodel_options_are_refused_by_name():
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        pixel_unet_config_from_diffusers({"resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(ValueError, match="SkipDownBlock2D"):
        pixel_unet_config_from_diffusers({"block_out_channels": [8], "down_block_types": ["SkipDownBlock2D"],
                                          "up_block_types": ["UpBlock2D"]})


def test_iddpm_respacing_starts_at_the_last_training_step_and_keeps_the_respaced_timesteps(diffusers_ddpm):
    """schedule="iddpm": IDDPM's space_timesteps (25 of 1000, first and last kept), where diffusers'
    leading spacing of the same folder starts at 960; both sample with every sampler."""
    folder, _ = diffusers_ddpm
    pipe = t2i.load(folder)
    plan = pipe.plan("ddpm", 25, "iddpm")
    assert plan.timesteps.tolist() == sorted(respace_timesteps(1000, "25"), reverse=True)
    assert plan.timesteps[0] == 999 and plan.timesteps[-1] == 0 and plan.x0_limit == ("clip", 1.0)
    assert pipe.plan("ddpm", 25, "default").timesteps[0] == 960
    a = pipe.generate("", seed=1, steps=25, schedule="iddpm").sample
    b = pipe.generate("", seed=1, steps=25, schedule="iddpm", sampler="ddim", eta=1.0).sample
    assert a.abs().max() <= 1.0 + 1e-6 and not torch.allclose(a, b)


class _Words:
    """A stand-in text encoder (no MiniLM load): each word -> a fixed random vector, 4 tokens, zero-padded."""

    max_length = 4

    def __init__(self, width: int = 8) -> None:
        self.width = width

    def encode(self, prompts: list[str]) -> TextEncoding:
        context = torch.zeros(len(prompts), self.max_length, self.width)
        for i, p in enumerate(prompts):
            for j, w in enumerate(p.split()[: self.max_length]):
                context[i, j] = torch.randn(self.width, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))
        return TextEncoding(context, None, None, [False] * len(prompts))


def test_text_conditional_network_follows_the_prompt_and_guidance():
    torch.manual_seed(0)
    cfg = PixelUNetConfig(block_channels=(8, 16), layers_per_block=(1, 1), attention=(False, True),
                          num_heads=(1, 2), transformer_depth=(1, 1), context_dim=8, norm_groups=4, sample_size=8)
    net = PixelUNet(cfg).eval()
    with torch.no_grad():
        net.conv_out.weight.mul_(OUTPUT_SCALE)
    pipe = DDPMPipeline(net, ddpm_schedule(), text_encoder=_Words())
    assert pipe.capabilities.accepts("guidance") and pipe.capabilities.accepts("negative_prompt")
    red, blue = (pipe.generate(p, seed=0, steps=4).sample for p in ("a red circle", "a blue square"))
    guided = pipe.generate("a red circle", seed=0, steps=4, guidance=3.0).sample
    assert (red - blue).abs().max() > 1e-3 and (red - guided).abs().max() > 1e-3
    with pytest.raises(ValueError, match="text-conditional"):
        net(torch.zeros(1, 3, 8, 8), torch.zeros(1))


def test_t2i_ddpm_file_round_trips_and_a_config_that_does_not_fit_its_weights_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from t2i.checkpoints.io import CheckpointError
    from t2i.systems.ddpm import SYSTEM, load_t2i_ddpm

    path = SYSTEM.write_tiny(tmp_path, 0)
    net, cfg = load_t2i_ddpm(path)
    assert cfg.net.context_dim == 384 and cfg.schedule.clip_sample is True
    with safe_open(str(path), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert torch.equal(state["unet.conv_out.weight"], net.conv_out.weight)
    raw = json.loads(meta["t2i_config"])
    raw["net"]["block_channels"] = [16, 64]
    save_file(state, tmp_path / "bad.safetensors", {**meta, "t2i_config": json.dumps(raw)})
    with pytest.raises(CheckpointError, match="do not fit|other shapes"):
        load_t2i_ddpm(tmp_path / "bad.safetensors")


def _eval_loss(path, text: _Words) -> float:
    """The eps loss of a saved model on 32 fixed shapes scenes, fixed t and noise."""
    from t2i.diffusion.losses import DiffusionLoss
    from t2i.systems.ddpm import load_t2i_ddpm
    from t2i.train.data import open_data
    from t2i.train.distributed import DistInfo

    net, cfg = load_t2i_ddpm(path)
    x, captions, _ = open_data("shapes", None, cfg.image_size, 123, print).batch(0, 32, DistInfo())
    loss = DiffusionLoss(cfg.schedule.alphas_cumprod(), "epsilon")
    cond = {"context": text.encode(captions).context}
    return sum(loss(net, x, cond, torch.Generator().manual_seed(k)).item() for k in range(4)) / 4


def test_tiny_ddpm_run_lowers_its_loss_and_exports_a_loadable_model(tmp_path):
    """`t2i train ddpm` in-process, tiny preset at 16x16, 30 steps: the exported EMA model's held-out
    eps loss falls well below the random network's (measured 1.15 -> 0.20; about 10 s), and the
    model.safetensors it writes generates through the registry."""
    text = _Words(384)
    common = dict(net_preset="tiny", image_size=16, batch_size=8, lr=3e-3, warmup=5, ckpt_every=1000, image_every=0,
                  log_every=10, seed=0, ema_decay=0.0)
    assert train_ddpm(DDPMTrainConfig(out=str(tmp_path / "r0"), steps=1, lr=1e-12, **{
        k: v for k, v in common.items() if k != "lr"}), text_encoder=text) == 0
    assert train_ddpm(DDPMTrainConfig(out=str(tmp_path / "r30"), steps=30, **common), text_encoder=text) == 0
    before, after = (_eval_loss(tmp_path / r / "model.safetensors", text) for r in ("r0", "r30"))
    print(f"eval loss before {before:.4f} after {after:.4f}")
    assert after < 0.6 * before
    assert "ddpm/loss" in (tmp_path / "r30" / "log.txt").read_text()
    assert resolve(tmp_path / "r30" / "model.safetensors")[0].name == "ddpm"


def test_cosine_betas_are_iddpms_and_reach_the_file_config():
    """`--beta-schedule cosine`: IDDPM eq. 17 (alpha_bar(t) = cos^2((t/T + s)/(1 + s) pi/2), betas capped at
    0.999), stated in the model config as diffusers names it; the linear schedule keeps far more signal at T."""
    from t2i.diffusion.schedules import cosine_alpha_bar
    from t2i.train.ddpm import resolve_model_config

    cosine = resolve_model_config(DDPMTrainConfig(out="", beta_schedule="cosine")).schedule
    linear = resolve_model_config(DDPMTrainConfig(out="")).schedule
    assert cosine.beta_schedule == "squaredcos_cap_v2" and linear.beta_schedule == "linear"
    acp = cosine.alphas_cumprod().double()
    expected = torch.tensor([cosine_alpha_bar((t + 1) / 1000) / cosine_alpha_bar(0) for t in range(1000)])
    assert torch.allclose(acp[:-1], expected[:-1].double(), rtol=1e-4)
    assert acp[-1] < 1e-6 < linear.alphas_cumprod()[-1] < 1e-4


def test_v_prediction_reaches_the_loss_and_the_file_with_or_without_a_learned_sigma(tmp_path):
    """`--prediction v_prediction`: the saved model's schedule says v (so every sampler reads the network
    as v), the training loss regresses v (a 2-step tiny run logs a loss that the eps target would not
    give from the same draws); with --learn-sigma too (6 output channels, v then the variance values;
    tests/test_iddpm.py trains and samples it)."""
    from t2i.train.ddpm import resolve_model_config

    assert resolve_model_config(DDPMTrainConfig(out="", prediction_type="v_prediction")).schedule.prediction_type \
        == "v_prediction"
    learned = resolve_model_config(DDPMTrainConfig(out="", prediction_type="v_prediction", learn_sigma=True))
    assert learned.schedule.prediction_type == "v_prediction" and learned.net.out_channels == 6
    text = _Words(384)
    losses = {}
    for kind in ("epsilon", "v_prediction"):
        out = tmp_path / kind
        assert train_ddpm(DDPMTrainConfig(out=str(out), steps=1, net_preset="tiny", image_size=16, batch_size=4,
                                          prediction_type=kind, ckpt_every=1000, image_every=0, log_every=1, seed=0),
                          text_encoder=text) == 0
        line = next(line for line in (out / "log.txt").read_text().splitlines() if "ddpm/loss=" in line)
        losses[kind] = float(line.split("ddpm/loss=")[1].split()[0])
        assert t2i.load(out / "model.safetensors").schedule.prediction_type == kind
    assert abs(losses["epsilon"] - losses["v_prediction"]) > 1e-3 * losses["epsilon"]
