"""Parity of t2i's U-Net with diffusers' UNet2DConditionModel on the same random weights.

diffusers is the oracle only; it is imported here, never by t2i. Each case builds a tiny
random diffusers U-Net from a config.json-style dict, translates the config with
`unet_config_from_diffusers`, loads the state dict with strict=True and compares outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from t2i.checkpoints.diffusers_nets import unet_config_from_diffusers, unet_config_to_diffusers
from t2i.nets.unet import UNET_CONFIGS, UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")
UNet2DConditionModel = diffusers.UNet2DConditionModel

TOL = 1e-4  # max |ours - ref| / std(ref)


pytestmark = pytest.mark.usefixtures("one_thread")

SD1 = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "cross_attention_dim": 24,
    "attention_head_dim": 4,  # SD1 quirk: this is the number of heads
    "norm_num_groups": 8,
}
SD2 = {
    **SD1,
    "layers_per_block": 1,
    "use_linear_projection": True,
    "attention_head_dim": [2, 4, 8],
    "cross_attention_dim": 40,
    "upcast_attention": True,
}
SDXL = {
    "sample_size": 16,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 3],
    "attention_head_dim": [2, 4, 4],
    "use_linear_projection": True,
    "cross_attention_dim": 40,
    "norm_num_groups": 8,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 16 + 6 * 8,  # pooled text (16) + 6 time ids
}
# Rarer options: only-cross-attention on one level, resnet-only mid block, other
# sinusoid layout, explicit time embedding width.
VARIANTS = {
    **SD1,
    "layers_per_block": [1, 2, 1],
    "only_cross_attention": [True, False, False],
    "mid_block_type": "UNetMidBlock2D",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "time_embedding_dim": 80,
}

CASES = {
    "sd1": (SD1, (16, 16)),
    "sd1_inpaint_9ch": ({**SD1, "in_channels": 9}, (16, 16)),
    "sd1_odd_size": (SD1, (10, 14)),  # not divisible by 4: the up path resizes to the skips
    "sd2": (SD2, (16, 16)),
    "sdxl": (SDXL, (16, 16)),
    "variants": (VARIANTS, (8, 8)),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Move norm affines away from (1, 0) and scale the output conv up, so layout errors in
    norms and small contributions cannot hide (a random tiny U-Net barely moves its input)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
        model.conv_out.weight.mul_(8.0)


def _inputs(cfg: dict, hw: tuple[int, int], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = 2
    out = {
        "x": torch.randn(batch, cfg.get("in_channels", 4), *hw, generator=g),
        "t": torch.tensor([999.0, 17.5]),
        "context": torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g),
    }
    if cfg.get("addition_embed_type") == "text_time":
        out["text_embeds"] = torch.randn(batch, 16, generator=g)
        # original size, crop top-left, target size, as SDXL pipelines pass them
        out["time_ids"] = torch.tensor(
            [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 32.0, 8.0, 512.0, 512.0]]
        )
    return out


def _reference(cfg: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**cfg).eval()
    _randomize(ref, seed)
    return ref


@pytest.mark.parametrize("case", list(CASES))
def test_unet_matches_diffusers(case: str) -> None:
    cfg, hw = CASES[case]
    ref = _reference(copy.deepcopy(cfg), seed=1)
    ours = UNet(unet_config_from_diffusers(copy.deepcopy(cfg))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)

    inp = _inputs(cfg, hw)
    added = None
    if "time_ids" in inp:
        added = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}
    with torch.no_grad():
        want = ref(inp["x"], inp["t"], inp["context"], added_cond_kwargs=added).sample
        got = ours(**inp)
    assert got.shape == want.shape == (2, cfg.get("out_channels", 4), *hw)
    err = ((got - want).abs().max() / want.std()).item()
    print(f"{case}: max |ours - diffusers| / std = {err:.2e} (output std {want.std().item():.3f})")
    assert err < TOL
    # The conditioning really matters (so the comparison above exercises every input).
    with torch.no_grad():
        other = ours(**{**inp, "context": inp["context"].flip(0)})
    assert ((other - got).abs().max() / want.std()).item() > 1e-3


def test_sdxl_requires_micro_conditioning() -> None:
    ours = UNet(unet_config_from_diffusers(copy.deepcopy(SDXL)))
    inp = _inputs(SDXL, (8, 8))
    with pytest.raises(ValueError, match="text_embeds and time_ids"):
        ours(inp["x"], inp["t"], inp["context"])


def test_scalar_timestep_broadcasts() -> None:
    torch.manual_seed(0)
    ours = UNet(UNET_CONFIGS["tiny"]).eval()
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 3, 32)
    with torch.no_grad():
        a = ours(x, torch.tensor(250.0), ctx)
        b = ours(x, torch.tensor([250.0, 250.0]), ctx)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["sd1", "sd2", "sdxl", "variants"])
def test_config_round_trip(case: str) -> None:
    """to_diffusers(from_diffusers(cfg)) builds the same diffusers network."""
    cfg = CASES[case][0]
    ours_cfg = unet_config_from_diffusers(copy.deepcopy(cfg))
    back = unet_config_to_diffusers(ours_cfg)
    assert unet_config_from_diffusers(copy.deepcopy(back)) == ours_cfg
    torch.manual_seed(0)
    a = UNet2DConditionModel(**cfg).state_dict()
    b = UNet2DConditionModel.from_config(back).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    # And our own module has exactly those parameters.
    c = UNet(ours_cfg).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in c.items()}


@pytest.mark.parametrize("name", ["sd15", "sd2", "sdxl"])
def test_presets_have_diffusers_layout(name: str) -> None:
    """Full-size presets: same parameter names and shapes as diffusers' model (built on the
    meta device, no memory or time spent)."""
    cfg = UNET_CONFIGS[name]
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg))
        ours = UNet(cfg)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert {k: v.shape for k, v in ref.state_dict().items()} == shapes


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("class_embed_type", "timestep"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("addition_embed_type", "text"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("encoder_hid_dim", 32),
    ],
)
def test_unsupported_options_are_named(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        unet_config_from_diffusers({**SD1, option: value})


def test_mismatched_up_blocks_rejected() -> None:
    bad = {**SD1, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
    with pytest.raises(ValueError, match="up_block_types"):
        unet_config_from_diffusers(bad)


# config.json files as published (abridged to the fields they carry).
SD15_JSON = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_JSON = {
    **SD15_JSON,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "sample_size": 96,
    "use_linear_projection": True,
    "upcast_attention": True,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
}
SDXL_JSON = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}


@pytest.mark.parametrize(("config", "preset"), [(SD15_JSON, "sd15"), (SD21_JSON, "sd2"), (SDXL_JSON, "sdxl")])
def test_published_configs_give_presets(config: dict, preset: str) -> None:
    assert unet_config_from_diffusers(copy.deepcopy(config)) == UNET_CONFIGS[preset]


def test_sdxl_refiner_layout() -> None:
    """The SDXL refiner: attention only on the middle two of four levels, 4 transformer blocks,
    5 time ids (aesthetic score instead of target size)."""
    refiner = {
        **SDXL_JSON,
        "attention_head_dim": [6, 12, 24, 24],
        "block_out_channels": [384, 768, 1536, 1536],
        "cross_attention_dim": 1280,
        "projection_class_embeddings_input_dim": 2560,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": 4,
    }
    cfg = unet_config_from_diffusers(copy.deepcopy(refiner))
    assert cfg.attention == (False, True, True, False) and cfg.transformer_depth == (4, 4, 4, 4)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**{k: v for k, v in refiner.items() if not k.startswith("_")})
        ours = UNet(cfg)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert {k: v.shape for k, v in ref.state_dict().items()} == shapes


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_config_survives_json(name: str) -> None:
    """Configs are saved as JSON inside checkpoints: asdict -> json -> UNetConfig(**d) is exact."""
    import dataclasses
    import json

    cfg = UNET_CONFIGS[name]
    assert UNetConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
