"""diffusers' `VQModel` folders (LDM-VQ, aMUSEd's tokenizer) as a t2i `VQAutoencoder`.

The encoder and decoder keys are already ours (both follow the KL autoencoder's layout); only
the codebook differs: diffusers holds it as `quantize.embedding.weight`, a parameter learnt by
the codebook loss, while ours is an EMA buffer with its statistics. A loaded codebook starts its
statistics at N = 1, m = e (what a fresh quantizer holds), so fine-tuning continues from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from t2i.autoencoders.vq import VQAutoencoder, VQAutoencoderConfig
from t2i.checkpoints.diffusers_folder import read_config_file
from t2i.checkpoints.diffusers_nets import check_unsupported, vae_config_from_diffusers
from t2i.checkpoints.io import load_component_weights

# VQModel's defaults where they differ from AutoencoderKL's (a config.json may leave them out).
_VQ_DEFAULTS: dict[str, Any] = {"latent_channels": 3, "num_vq_embeddings": 256, "vq_embed_dim": None}
# "spatial" is MoVQ's decoder norm (conditioned on the codes): not implemented.
_VQ_UNSUPPORTED: dict[str, Any] = {"norm_type": "group"}


def vq_config_from_diffusers(cfg: dict[str, Any]) -> VQAutoencoderConfig:
    """VQAutoencoderConfig from a diffusers VQModel config.json dict. ValueError names unsupported options.
    `scaling_factor`, `lookup_from_codebook` and `force_upcast` concern diffusion on the latents, not the
    tokenizer, and are ignored."""
    check_unsupported(cfg, _VQ_UNSUPPORTED, "VQModel config")
    full = {**_VQ_DEFAULTS, **cfg}
    # The encoder/decoder part is an AutoencoderKL config (quant convs always present in a VQModel).
    blocks = vae_config_from_diffusers({**full, "use_quant_conv": True, "use_post_quant_conv": True})
    dim = full["vq_embed_dim"]
    return VQAutoencoderConfig(
        in_channels=blocks.in_channels, out_channels=blocks.out_channels, block_channels=blocks.block_channels,
        layers_per_block=blocks.layers_per_block, latent_channels=blocks.latent_channels,
        norm_groups=blocks.norm_groups, mid_attention=blocks.mid_attention,
        code_dim=None if dim is None else int(dim), num_codes=int(full["num_vq_embeddings"]),
        sample_size=blocks.sample_size)


def vq_state_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VQModel state dict in our names: the codebook moved to `quantize.codebook`, its EMA
    statistics added."""
    state = dict(state)
    codebook = state.pop("quantize.embedding.weight")  # (K, D)
    state["quantize.codebook"] = codebook
    state["quantize.cluster_size"] = torch.ones(codebook.shape[0], dtype=codebook.dtype)
    state["quantize.embed_avg"] = codebook.clone()
    return state


def load_diffusers_vq(folder: str | Path, variant: str | None = None) -> VQAutoencoder:
    """A diffusers VQModel folder (config.json + diffusion_pytorch_model.*) as a frozen VQAutoencoder."""
    folder = Path(folder)
    cfg = read_config_file(vq_config_from_diffusers, folder / "config.json")
    model = VQAutoencoder(cfg)
    state = vq_state_from_diffusers(load_component_weights(folder, "diffusion_pytorch_model", variant))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval().requires_grad_(False)
