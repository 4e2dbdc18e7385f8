"""TAESD, the tiny autoencoder that t2i decodes previews with (diffusers' `AutoencoderTiny` layout).

TAESD (Bohan, 2023, github.com/madebyollin/taesd) replaces the SD VAE by a plain stack of 3x3
convolutions: ReLU residual blocks at a constant width of 64, nearest-neighbour upsampling, no
attention and no GroupNorm. That is why it is fast: the SD decoder spends most of its FLOPs in
512- and 256-wide ResBlocks at high resolution (and its mid-block attention is quadratic in the
pixels); this one keeps every layer 64 wide. It is trained by distillation to reproduce the frozen
VAE on the same latents (`t2i.train.preview`), so its images are a close, slightly blurrier preview
of the real decode.

The modules and parameter names are diffusers' (`encoder.layers.N...`, `decoder.layers.N...`), so
a TAESD from elsewhere (diffusers folder or madebyollin's single files: `t2i.checkpoints.taesd`)
and one distilled by `t2i train preview` are the same kind of file, and ours export as a diffusers
`AutoencoderTiny` folder.

Latent conventions. The networks read and write TAESD's own latent space `u` (for TAESD and
TAESDXL the diffusion latents, `(z - shift) * scaling_factor` of the SD VAE; for TAESD3 and TAEF1
the unscaled VAE latents). A `PreviewDecoder` called as a module keeps the VAE decoder's contract:
unscaled VAE latents z in (what `AutoencoderKL.decode` takes), images in [-1, 1] out; it first maps
`u = (z - latent_shift) * latent_scale`. That pair depends on the VAE as well as on the file, so a
file from elsewhere gets it from the VAE it is used with (`load(path, vae=...)`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from t2i.autoencoders.kl import AutoencoderKLConfig
from t2i.nets.resample import Upsample, nearest2x_conv3x3

SYSTEM = "preview_decoder"  # "t2i_system" in the file's metadata


@dataclass
class PreviewDecoderConfig:
    """Shape of a TAESD (decoder, and the encoder that mirrors it).

    In diffusers' `AutoencoderTiny` terms (`t2i.checkpoints.taesd` converts): every entry of
    `decoder_block_out_channels` and `encoder_block_out_channels` is `width`, `num_decoder_blocks`
    is `(blocks,) * upsamples + (final_blocks,)` and `num_encoder_blocks` its reverse.

    Attributes:
        latent_channels: channels of the latents (4 for SD 1/2/XL and the shapes VAE, 16 for SD3/FLUX).
        out_channels: image channels (3).
        upsamples: 2x upsamplings, log2 of the VAE's downsample factor (2 for the shapes model's
            f=4 VAE, 3 for SD's f=8).
        width: channels of every convolution (TAESD: 64).
        blocks: residual blocks before each upsampling (TAESD: 3).
        final_blocks: residual blocks at full resolution (TAESD: 1; the costliest per block).
        encoder: whether the model has the encoder too (a decoder-only file from elsewhere has not).
        latent_scale, latent_shift: the network reads u = (z - latent_shift) * latent_scale of
            unscaled VAE latents z. For a decoder of the diffusion latents (ours, TAESD, TAESDXL) these
            are the VAE's scaling_factor and shift_factor. None: not known yet (a file from
            elsewhere loaded without its VAE). Not diffusers' `latent_magnitude`/`latent_shift`,
            which only quantise latents to bytes for storage.
    """

    latent_channels: int = 4
    out_channels: int = 3
    upsamples: int = 3
    width: int = 64
    blocks: int = 3
    final_blocks: int = 1
    encoder: bool = True
    latent_scale: float | None = 1.0
    latent_shift: float = 0.0

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each axis (the VAE's factor it stands in for)."""
        return 2**self.upsamples

    @classmethod
    def for_vae(cls, vae: AutoencoderKLConfig, width: int = 64, blocks: int = 3,
                final_blocks: int = 1) -> PreviewDecoderConfig:
        """A TAESD of this shape on `vae`'s diffusion latents: channels, upsamplings and scaling from `vae`."""
        return cls(latent_channels=vae.latent_channels, out_channels=vae.out_channels,
                   upsamples=int(math.log2(vae.downsample_factor)), width=width, blocks=blocks,
                   final_blocks=final_blocks, latent_scale=vae.scaling_factor, latent_shift=vae.shift_factor or 0.0)


class TinyBlock(nn.Module):
    """TAESD's residual block: relu(x + conv(x)), conv = conv3x3 -> relu -> conv3x3 -> relu -> conv3x3,
    no normalisation. Names as diffusers' `AutoencoderTinyBlock` (conv.0, conv.2, conv.4); its `skip`
    is the identity at the constant width TAESD uses, so it holds no weights."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return F.relu(self.conv(x) + x)


def _upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(nearest_2x(x)), (B, C, H, W) -> (B, C_out, 2H, 2W): on large maps as the fused phase convolution
    (`nearest2x_conv3x3`), never building the upsampled map, from the threshold `Upsample` uses."""
    if x.shape[-2] * x.shape[-1] >= Upsample.PHASE_MIN_PIXELS:
        return nearest2x_conv3x3(x, conv.weight, conv.bias)
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TinyDecoder(nn.Module):
    """diffusers' `DecoderTiny`: u (B, latent_channels, h, w) in TAESD's latent space -> (B, 3, h * f, w * f),
    about [-1, 1]. `layers` holds, by index as diffusers numbers them: conv_in, ReLU, then per stage its
    blocks and (but the last stage) nn.Upsample + a bias-free conv, and the output conv last."""

    def __init__(self, cfg: PreviewDecoderConfig) -> None:
        super().__init__()
        w = cfg.width
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, w, 3, padding=1), nn.ReLU()]
        for _ in range(cfg.upsamples):
            layers += [*(TinyBlock(w) for _ in range(cfg.blocks)), nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(w, w, 3, padding=1, bias=False)]
        layers += [*(TinyBlock(w) for _ in range(cfg.final_blocks)), nn.Conv2d(w, cfg.out_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        # TAESD's soft clamp: sampler outputs can stray far outside the latents the VAE ever made; tanh
        # bounds them to (-3, 3) and is nearly the identity inside (|u| < 1 moves by under 4%).
        h = 3.0 * torch.tanh(u / 3.0)
        layers = list(self.layers)
        i = 0
        while i < len(layers):
            if isinstance(layers[i], nn.Upsample):  # with the conv after it: (B, w, H, W) -> (B, w, 2H, 2W)
                h, i = _upsample_conv(h, layers[i + 1]), i + 2
            else:
                h, i = layers[i](h), i + 1
        return h * 2.0 - 1.0  # the network writes [0, 1] (TAESD's range); diffusers' [-1, 1]


class TinyEncoder(nn.Module):
    """diffusers' `EncoderTiny`: image (B, 3, H, W) in [-1, 1] -> u (B, latent_channels, H / f, W / f) in
    TAESD's latent space. `layers`: conv_in, its blocks, then per downsampling a bias-free stride-2 conv
    and its blocks, and the output conv; the block counts mirror the decoder's."""

    def __init__(self, cfg: PreviewDecoderConfig) -> None:
        super().__init__()
        w = cfg.width
        layers: list[nn.Module] = [nn.Conv2d(cfg.out_channels, w, 3, padding=1),
                                   *(TinyBlock(w) for _ in range(cfg.final_blocks))]
        for _ in range(cfg.upsamples):
            layers += [nn.Conv2d(w, w, 3, padding=1, stride=2, bias=False), *(TinyBlock(w) for _ in range(cfg.blocks))]
        layers.append(nn.Conv2d(w, cfg.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x + 1.0) / 2.0)  # TAESD reads [0, 1]


class PreviewDecoder(nn.Module):
    """TAESD with the VAE decoder's contract: z (B, latent_channels, h, w), unscaled VAE latents ->
    image (B, 3, h * f, w * f), about [-1, 1] (not clamped, like the VAE decoder it imitates; `to_pil`
    clamps). `decoder` (and `encoder`) are diffusers' `AutoencoderTiny` modules, parameter names included."""

    def __init__(self, cfg: PreviewDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = TinyEncoder(cfg) if cfg.encoder else None
        self.decoder = TinyDecoder(cfg)
        self._init_weights()

    def _init_weights(self) -> None:
        # Without normalisation, a stack of default-initialised residual blocks grows the activations
        # block after block; zeroing each block's last conv makes it start as the identity (SkipInit,
        # De & Smith 2020), so the untrained network is well scaled at any depth.
        for m in self.modules():
            if isinstance(m, TinyBlock):
                nn.init.zeros_(m.conv[4].weight)
                nn.init.zeros_(m.conv[4].bias)
        # The output conv starts at zero with bias 0.5: mid-grey, 0 after the decoder's [0, 1] -> [-1, 1],
        # the image a distillation starts closest to (not a random colour field of the ReLU features).
        out = self.decoder.layers[-1]
        nn.init.zeros_(out.weight)
        nn.init.constant_(out.bias, 0.5)

    def _latent_scale(self) -> float:
        if self.cfg.latent_scale is None:
            raise ValueError("this TAESD does not say which VAE's latents it decodes: load it with "
                             "PreviewDecoder.load(path, vae=<the model's VAE config>)")
        return self.cfg.latent_scale

    def to_taesd_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled VAE latents z -> TAESD's latent space u = (z - latent_shift) * latent_scale, same shape."""
        return (z - self.cfg.latent_shift) * self._latent_scale()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.to_taesd_latents(z))  # (B, 3, h * f, w * f)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images x (B, 3, H, W) in [-1, 1] -> unscaled VAE latents (B, C, H / f, W / f), as the VAE's
        posterior mean (the inverse of `forward`'s input map)."""
        if self.encoder is None:
            raise ValueError("this TAESD has no encoder (a decoder-only file)")
        u = self.encoder(x)  # (B, C, H / f, W / f)
        return u / self._latent_scale() + self.cfg.latent_shift

    def save(self, path: str | Path) -> None:
        """A t2i file: float32 weights under diffusers' names, the config in the metadata, written atomically."""
        from t2i.checkpoints.taesd import write_t2i_file

        write_t2i_file(self.state_dict(), dataclasses.asdict(self.cfg), path, SYSTEM)

    def save_pretrained(self, folder: str | Path) -> None:
        """A diffusers `AutoencoderTiny` folder (config.json + diffusion_pytorch_model.safetensors) that
        `AutoencoderTiny.from_pretrained` loads with every key matched; the weights carry our config too."""
        from t2i.checkpoints.taesd import write_diffusers_folder

        write_diffusers_folder(self.state_dict(), dataclasses.asdict(self.cfg), folder, SYSTEM)

    @classmethod
    def load(cls, path: str | Path, vae: AutoencoderKLConfig | None = None) -> PreviewDecoder:
        """A TAESD in any layout (`t2i.checkpoints.taesd.read_taesd`: our file, a diffusers folder or
        single file, madebyollin's taesd_decoder file) -> frozen PreviewDecoder in eval mode. A file
        that does not carry its latent scaling (every file made elsewhere) takes it from `vae`."""
        from t2i.checkpoints.taesd import read_taesd

        found = read_taesd(path, SYSTEM)
        cfg = PreviewDecoderConfig(**found.config)
        if found.latent_scale is None and vae is not None:
            # u = z / scaling_factor_taesd + shift_taesd of the diffusion latent (z - vae_shift) * vae_scale
            shift = vae.shift_factor or 0.0
            cfg.latent_scale = vae.scaling_factor / found.taesd_scaling
            cfg.latent_shift = shift - found.taesd_shift * found.taesd_scaling / vae.scaling_factor
        model = cls(cfg)
        model.load_state_dict(found.state)
        return model.eval().requires_grad_(False)


PREVIEW_DECODER_CONFIGS: dict[str, PreviewDecoderConfig] = {
    # TAESD's shape for SD 1/2/XL latents (f = 8); latent_scale is SD 1/2's (SDXL: 0.13025).
    "sd": PreviewDecoderConfig(upsamples=3, latent_scale=0.18215),
    # The shapes model's f = 4 VAE (t2i.systems.shapes_ldm); its scaling comes from the model file. That VAE
    # is small already: its decoder costs 0.51 GFLOP per 64x64 image, TAESD's width 2.15, width 32 0.54,
    # width 16 0.14, so only a narrower preview decodes it faster.
    "shapes": PreviewDecoderConfig(upsamples=2),
    # Test-sized (f = 4).
    "tiny": PreviewDecoderConfig(upsamples=2, width=8, blocks=1),
}
