"""The real Stable Diffusion 1.5 architecture with random weights, saved as a diffusers folder.

Speed does not depend on the weights' values, so the benchmark builds SD 1.5's exact shapes
(U-Net 320/640/1280/1280 with 8 heads, CLIP ViT-L/14 text encoder, the SD VAE) locally with
diffusers and transformers' default initialisation; nothing is downloaded. The folder
(about 4 GB) goes under /tmp and is reused by later runs; it is never committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

DEFAULT_FOLDER = Path("/tmp/t2i_bench_sd15")

# SD 1.5's component configs (runwayml/stable-diffusion-v1-5), written out so nothing is fetched.
UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215,
)
CLIP_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, prediction_type="epsilon",
)


def build_sd15_folder(folder: Path = DEFAULT_FOLDER, seed: int = 0) -> Path:
    """Write the random SD 1.5 folder unless it is already complete; returns its path."""
    return _build_folder(folder, UNET_CONFIG, CLIP_CONFIG, "PNDMScheduler", SCHEDULER_CONFIG, seed)


# SD-Turbo's (stabilityai/sd-turbo: the SD 2.1 architecture at 512x512, OpenCLIP ViT-H/14 text
# tower, 23 of its 24 layers) and TAESD's (madebyollin/taesd, diffusers' AutoencoderTiny defaults).
TURBO_FOLDER = Path("/tmp/t2i_bench_sdturbo")
TAESD_FOLDER = Path("/tmp/t2i_bench_taesd")
TURBO_UNET_CONFIG = {**UNET_CONFIG, "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024,
                     "use_linear_projection": True}
TURBO_CLIP_CONFIG = {**CLIP_CONFIG, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                     "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}
TURBO_SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon",
                              timestep_spacing="trailing")


def build_turbo_folder(folder: Path = TURBO_FOLDER, seed: int = 0) -> Path:
    """Write the random SD-Turbo-architecture folder unless it is already complete; returns its path."""
    return _build_folder(folder, TURBO_UNET_CONFIG, TURBO_CLIP_CONFIG, "EulerDiscreteScheduler",
                         TURBO_SCHEDULER_CONFIG, seed)


def build_taesd_folder(folder: Path = TAESD_FOLDER, seed: int = 0) -> Path:
    """Write a random TAESD (diffusers `AutoencoderTiny`, SD 1/2 latents) folder unless it exists."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    tmp = folder.with_name(folder.name + ".partial")
    AutoencoderTiny().save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    return folder


def _build_folder(folder: Path, unet_config: dict, clip_config: dict, scheduler: str, scheduler_config: dict,
                  seed: int) -> Path:
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from t2i.text.clip_tokenizer import CLIPTokenizer

    torch.manual_seed(seed)
    tmp = folder.with_name(folder.name + ".partial")
    CLIPTokenizer.default(pad_token="<|endoftext|>").save(tmp / "tokenizer")
    tokenizer = HFCLIPTokenizer(str(tmp / "tokenizer" / "vocab.json"), str(tmp / "tokenizer" / "merges.txt"),
                                pad_token="<|endoftext|>", model_max_length=77)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE_CONFIG), text_encoder=CLIPTextModel(CLIPTextConfig(**clip_config)),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**unet_config),
        scheduler=getattr(diffusers, scheduler)(**scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    prefix_text_encoder_keys(tmp / "text_encoder" / "model.safetensors")
    tmp.rename(folder)
    return folder


def prefix_text_encoder_keys(path: Path) -> None:
    """Recent transformers save CLIPTextModel flat (`encoder.layers...`); SD 1.5's own folder has
    `text_model.encoder.layers...`, the names every transformers version reads (optimum-intel pins an
    older one, which would silently re-initialise a flat text encoder), so write those."""
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    if any(k.startswith("text_model.") for k in state):
        return
    save_file({k if k.startswith("text_projection") else f"text_model.{k}": v for k, v in state.items()}, path,
              metadata={"format": "pt"})


if __name__ == "__main__":
    print(build_sd15_folder(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_FOLDER))
