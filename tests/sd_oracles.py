"""Tiny random Stable Diffusion pipelines built in diffusers, the oracle for our parity tests.

Each builder writes a diffusers folder (the layout real checkpoints come in) and returns the
diffusers pipeline, so a test can load the folder in t2i and compare numbers with the
reference. The U-Net's output convolution is scaled up: a random tiny U-Net barely moves the
latents, which would let a wrong sampler step or attention layout pass unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from t2i.text.clip_tokenizer import CLIPTokenizer

OUTPUT_SCALE = 8.0


def _tokenizer(folder: Path, pad_token: str):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    CLIPTokenizer.default(pad_token=pad_token).save(folder)
    return HFCLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                            model_max_length=77)


def _clip(width: int, layers: int, act: str, eos: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=act, bos_token_id=49406,
                         eos_token_id=eos, pad_token_id=1, projection_dim=projection or width)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.18215)


def _scale_output(unet) -> None:
    with torch.no_grad():
        unet.conv_out.weight.mul_(OUTPUT_SCALE)
        unet.conv_out.bias.mul_(OUTPUT_SCALE)


def build_sd1(folder: Path, seed: int = 0):
    """SD1-like: eps prediction, conv projections, quick-GELU CLIP, last hidden state."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    _scale_output(unet)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="leading", prediction_type="epsilon")
    tok_dir = folder / "tokenizer"
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_clip(32, 2, "quick_gelu", 2),
                                   tokenizer=_tokenizer(tok_dir, "<|endoftext|>"), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def build_sd2(folder: Path, seed: int = 0):
    """SD2-like: v prediction, linear projections, per-level head dims, GELU encoder, `!` padding."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                attention_head_dim=(2, 4), use_linear_projection=True)
    _scale_output(unet)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="leading", prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_clip(32, 2, "gelu", 2),
                                   tokenizer=_tokenizer(folder / "tokenizer", "!"), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def build_sdxl(folder: Path, seed: int = 0):
    """SDXL-like: two encoders (penultimate states concatenated, pooled projection from the
    second), text_time micro-conditioning, transformer depth per level, a level without attention."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=64,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=(2, 4), use_linear_projection=True,
                                transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    _scale_output(unet)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip(32, 2, "quick_gelu", 49407),
                                     text_encoder_2=_clip(32, 2, "gelu", 49407, projection=32),
                                     tokenizer=_tokenizer(folder / "tokenizer", "<|endoftext|>"),
                                     tokenizer_2=_tokenizer(folder / "tokenizer_2", "!"),
                                     unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


BUILDERS = {"sd1": build_sd1, "sd2": build_sd2, "sdxl": build_sdxl}

# Our sampler name (and Karras flag) -> the diffusers scheduler that implements it.
DIFFUSERS_SCHEDULERS = {
    ("ddim", False): ("DDIMScheduler", {}),
    ("euler", False): ("EulerDiscreteScheduler", {}),
    ("heun", False): ("HeunDiscreteScheduler", {}),
    ("dpmpp_2m", False): ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("dpmpp_2m", True): ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                         "use_karras_sigmas": True}),
}


def reference_latents(pipe, prompt: str, sampler: str, karras: bool, steps: int, guidance: float, seed: int,
                      size: int, negative_prompt: str | None = None) -> torch.Tensor:
    """The final latents diffusers produces (output_type="latent": before VAE scaling is undone)."""
    import diffusers

    cls_name, extra = DIFFUSERS_SCHEDULERS[(sampler, karras)]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    out = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator("cpu").manual_seed(seed), height=size, width=size, output_type="latent")
    return out.images


def build_lcm(folder: Path, seed: int = 0):
    """A latent consistency model in diffusers' `LatentConsistencyModelPipeline` layout: the SD1-like
    nets with the guidance-scale input (`time_cond_proj_dim`) and LCMScheduler's defaults."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                                time_cond_proj_dim=32)
    _scale_output(unet)
    pipe = LatentConsistencyModelPipeline(vae=_vae(), text_encoder=_clip(32, 2, "quick_gelu", 2),
                                          tokenizer=_tokenizer(folder / "tokenizer", "<|endoftext|>"), unet=unet,
                                          scheduler=LCMScheduler(), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe
