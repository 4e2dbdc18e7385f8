"""LoRA loading (issue 21): tiny random SD1 / SDXL models, LoRAs written by the test in the PEFT
(diffusers) and kohya (A1111) layouts, loaded into diffusers (`load_lora_weights` + `fuse_lora`, the
oracle) and into t2i (`apply_loras`): the same merged weights and final latents; unmerging restores
the base weights bit-exactly; unmatched keys and LoRAs for another architecture are refused by name."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sd_oracles import build_sd1, build_sdxl, reference_latents

import t2i
from t2i.adapters.lora import (
    LoraError,
    apply_loras,
    parse_lora_arg,
    prompt_loras,
    run_with_prompt_loras,
)
from t2i.checkpoints.sd_keys import unet_to_original
from t2i.checkpoints.transformers_text import clip_state_dict_from_transformers
from t2i.systems.base import GenerationRequest

WEIGHT_TOL = 1e-6
LATENT_TOL = 2e-4  # max |ours - diffusers| relative to the std of diffusers' latents
# Attention, feed-forward, projections and LoCon convolutions (3x3 resnet convs, 1x1 shortcut)
UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj"]
TEXT_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
BUILDERS = {"sd1": build_sd1, "sdxl": build_sdxl}
TEXT_SLOTS = {"sd1": [("text_encoder", "lora_te_")],
              "sdxl": [("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")]}


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "model"
    BUILDERS[request.param](folder)
    return request.param, folder


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD1 folder, its diffusers pipeline (left unfused: a template for writing LoRAs) and t2i's
    (every test restores its weights, and checks that it did)."""
    folder = tmp_path_factory.mktemp("sd1") / "model"
    ref = build_sd1(folder)
    return folder, ref, t2i.load(folder)


def _diffusers(folder: Path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)


def _peft_layers(net, modules: list[str], alpha: float, seed: int) -> tuple[dict, dict]:
    """A random (both factors non-zero) PEFT LoRA of rank 4 on a copy of `net`: (state dict, config)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    cfg = LoraConfig(r=4, lora_alpha=alpha, target_modules=modules, init_lora_weights=False)
    torch.manual_seed(seed)
    copied = copy.deepcopy(net)
    inject_adapter_in_model(cfg, copied)
    return get_peft_model_state_dict(copied), cfg.to_dict()


def write_peft_lora(ref, family: str, folder: Path, seed: int = 0) -> Path:
    """diffusers' own writer: `unet.` / `text_encoder.` / `text_encoder_2.` keys, alphas (8 on the U-Net,
    2 on the text encoders, rank 4) in the safetensors metadata."""
    parts = {"unet": _peft_layers(ref.unet, UNET_MODULES, 8, seed)}
    for i, (component, _) in enumerate(TEXT_SLOTS[family]):
        parts[component] = _peft_layers(getattr(ref, component), TEXT_MODULES, 2, seed + 1 + i)
    kwargs = {f"{c}_lora_layers": sd for c, (sd, _) in parts.items()}
    kwargs.update({f"{c}_lora_adapter_metadata": meta for c, (_, meta) in parts.items()})
    type(ref).save_lora_weights(folder, safe_serialization=True, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def write_kohya_lora(ref, family: str, path: Path, seed: int = 0, ours=None) -> Path:
    """kohya / A1111 keys written directly: `lora_unet_` (diffusers names for SD1, the original
    `input_blocks_...` names for SDXL as kohya's SDXL trainer writes them), `lora_te_` / `lora_te1_` /
    `lora_te2_` with transformers names, `.lora_down/.lora_up/.alpha`."""
    state = {}

    def add(name: str, sd: dict, alpha: float) -> None:
        for key, value in sd.items():
            module, _, part = key.rpartition(".lora_")
            kohya = f"{name(module)}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"
            state[kohya] = value.contiguous()
            state[f"{name(module)}.alpha"] = torch.tensor(float(alpha))

    unet_sd, _ = _peft_layers(ref.unet, UNET_MODULES, 8, seed)
    if family == "sdxl":
        modules = sorted({k.rpartition(".lora_")[0] for k in unet_sd})
        original = unet_to_original({f"{m}.weight": torch.empty(0) for m in modules}, ours.unet.cfg)
        names = dict(zip(modules, (k.removesuffix(".weight") for k in original), strict=True))
        add(lambda m: "lora_unet_" + names[m].replace(".", "_"), unet_sd, 8)
    else:
        add(lambda m: "lora_unet_" + m.replace(".", "_"), unet_sd, 8)
    for i, (component, prefix) in enumerate(TEXT_SLOTS[family]):
        sd, _ = _peft_layers(getattr(ref, component), TEXT_MODULES, 2, seed + 1 + i)
        add(lambda m, p=prefix: p + ("text_model." + m.removeprefix("text_model.")).replace(".", "_"), sd, 2)
    save_file(state, path)
    return path


def _unet_error(ref, ours) -> float:
    theirs, mine = ref.unet.state_dict(), ours.unet.state_dict()
    assert set(theirs) == set(mine)
    return max((theirs[k] - mine[k]).abs().max().item() for k in theirs)


def _text_error(ref, ours, family: str) -> float:
    towers = [ours.text_encoder.model] if family == "sd1" else [e.model for e in ours.text_encoder.encoders]
    err = 0.0
    for (component, _), tower in zip(TEXT_SLOTS[family], towers, strict=True):
        theirs = clip_state_dict_from_transformers(getattr(ref, component).state_dict())
        mine = tower.state_dict()
        err = max(err, *((theirs[k] - mine[k]).abs().max().item() for k in theirs))
    return err


def _snapshot(pipe) -> dict[str, torch.Tensor]:
    nets = {"unet": pipe.unet, "text": pipe.text_encoder}
    return {f"{n}.{k}": v.clone() for n, net in nets.items() for k, v in net.state_dict().items()}


def _assert_restored(pipe, base: dict[str, torch.Tensor]) -> None:
    now = _snapshot(pipe)
    assert now.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], now[k])]
    assert not changed, f"not restored bit-exactly: {changed[:5]}"


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_merged_lora_matches_diffusers(family, fmt, tmp_path):
    name, folder = family
    ref, ours = _diffusers(folder), t2i.load(folder)
    base = _snapshot(ours)
    if fmt == "peft":
        path = write_peft_lora(ref, name, tmp_path)
    else:
        path = write_kohya_lora(ref, name, tmp_path / "style.safetensors", ours=ours)
    weight = 0.7
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=weight)
    ref.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    moved = _unet_error(ref, ours)  # fused diffusers against our base weights
    with apply_loras(ours, [(path, weight)]) as handle:
        assert handle.layers > 0
        unet_err, text_err = _unet_error(ref, ours), _text_error(ref, ours, name)
        prompt, seed, steps, guidance = "a red circle above a blue square", 3, 3, 5.0
        expected = reference_latents(ref, prompt, "euler", False, steps, guidance, seed, 16)
        got = ours.generate(prompt, seed=seed, steps=steps, guidance=guidance, sampler="euler",
                            width=16, height=16).latents
        latent_err = ((got - expected).abs().max() / expected.std()).item()
    print(f"{name} {fmt}: U-Net weights {unet_err:.2e}, text weights {text_err:.2e}, latents {latent_err:.2e} "
          f"of their std (the LoRA moved weights by {moved:.2e})")
    assert moved > 1e-2  # the LoRA changes the weights: the comparisons below can fail
    assert unet_err < WEIGHT_TOL and text_err < WEIGHT_TOL
    assert latent_err < LATENT_TOL
    _assert_restored(ours, base)


def test_several_loras_with_weights_match_diffusers(sd1, tmp_path):
    folder, template, ours = sd1
    ref = _diffusers(folder)
    a = write_peft_lora(template, "sd1", tmp_path / "a", seed=1)
    b = write_kohya_lora(template, "sd1", tmp_path / "b.safetensors", seed=5)
    ref.load_lora_weights(str(a), adapter_name="a")
    ref.load_lora_weights(str(b), adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.6, -0.3])
    ref.fuse_lora(adapter_names=["a", "b"])
    ref.unload_lora_weights()
    base = _snapshot(ours)
    with apply_loras(ours, [(a, 0.6), (b, -0.3)]):
        assert _unet_error(ref, ours) < WEIGHT_TOL and _text_error(ref, ours, "sd1") < WEIGHT_TOL
    _assert_restored(ours, base)


def test_nested_handles_unmerge_in_reverse_order(sd1, tmp_path):
    _folder, ref, ours = sd1
    a = write_kohya_lora(ref, "sd1", tmp_path / "a.safetensors", seed=1)
    base = _snapshot(ours)
    first = apply_loras(ours, [(a, 1.0)])
    second = apply_loras(ours, [(a, 0.5)])
    with pytest.raises(LoraError, match="reverse order"):
        first.unmerge()
    second.unmerge()
    first.unmerge()
    _assert_restored(ours, base)


def test_unmatched_keys_are_named(sd1, tmp_path):
    _folder, ref, ours = sd1
    path = write_kohya_lora(ref, "sd1", tmp_path / "a.safetensors")
    from safetensors.torch import load_file

    state = load_file(path)
    state["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.ones(4, 8)
    state["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.ones(8, 4)
    state["something_else"] = torch.ones(1)
    extra = tmp_path / "extra.safetensors"
    save_file(state, extra)
    base = _snapshot(ours)
    with pytest.raises(LoraError, match=r"2 of .* match no layer.*something_else.*down_blocks_9"):
        apply_loras(ours, [(extra, 1.0)])
    _assert_restored(ours, base)  # refused before any weight changed
    with pytest.warns(UserWarning, match="down_blocks_9"), apply_loras(ours, [(extra, 1.0)], strict=False) as h:
        clean = _snapshot(ours)
        assert h.layers > 0
    with apply_loras(ours, [(path, 1.0)]):
        assert all(torch.equal(v, clean[k]) for k, v in _snapshot(ours).items())  # the rest was applied
    _assert_restored(ours, base)


def test_lora_for_another_architecture_is_refused(sd1, tmp_path):
    _folder, sd1_ref, sd1 = sd1
    sdxl_ref = build_sdxl(tmp_path / "sdxl")
    sdxl = t2i.load(tmp_path / "sdxl")
    sdxl_kohya = write_kohya_lora(sdxl_ref, "sdxl", tmp_path / "xl.safetensors", ours=sdxl)
    with pytest.raises(LoraError, match=r"an SDXL LoRA .*lora_te[12]_"):
        apply_loras(sd1, [(sdxl_kohya, 1.0)])
    sd1_kohya = write_kohya_lora(sd1_ref, "sd1", tmp_path / "one.safetensors")
    with pytest.raises(LoraError, match="one-text-encoder model"):
        apply_loras(sdxl, [(sd1_kohya, 1.0)])
    # U-Net only, names both models have (the middle cross-attention), other widths: refused by shape.
    from safetensors.torch import load_file

    unet_only = {k: v for k, v in load_file(write_peft_lora(sdxl_ref, "sdxl", tmp_path / "p")).items()
                 if k.startswith("unet.mid_block.attentions.0.transformer_blocks.0.attn2")}
    save_file(unet_only, tmp_path / "xl_unet.safetensors")
    with pytest.raises(LoraError, match=r"do not fit .*another architecture"):
        apply_loras(sd1, [(tmp_path / "xl_unet.safetensors", 1.0)])


def test_prompt_tags_and_arguments():
    assert prompt_loras("a cat <lora:ink:0.8>, <lora:fog> at night") == ("a cat ,  at night", [("ink", 0.8),
                                                                                                ("fog", 1.0)])
    assert prompt_loras("<lora:ink:0.5:0.5>")[1] == [("ink", 0.5)]
    with pytest.raises(LoraError, match="separate"):
        prompt_loras("<lora:ink:0.5:1>")
    assert parse_lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_arg("C:/x.safetensors") == ("C:/x.safetensors", 1.0)


def test_prompt_tag_applies_for_one_run_and_stays_in_the_parameters(sd1, tmp_path):
    _folder, ref, ours = sd1
    loras = tmp_path / "loras" / "styles"
    loras.mkdir(parents=True)
    path = write_kohya_lora(ref, "sd1", loras / "ink.safetensors")
    settings = dict(seed=2, steps=2, sampler="euler", width=16, height=16)
    base = _snapshot(ours)
    tagged = GenerationRequest(prompt="a red circle <lora:ink:0.6>", **settings)
    result = run_with_prompt_loras(ours, tagged, tmp_path / "loras", ours.run)
    _assert_restored(ours, base)
    with apply_loras(ours, [(path, 0.6)]):
        expected = ours.run(GenerationRequest(prompt="a red circle ", **settings))
    plain = ours.run(GenerationRequest(prompt="a red circle ", **settings))
    assert torch.equal(result.latents, expected.latents)
    assert (result.latents - plain.latents).abs().max() > 1e-3  # the LoRA changed the image
    assert result.images[0].info["parameters"].startswith("a red circle <lora:ink:0.6>\n")
    with pytest.raises(LoraError, match="no nope.safetensors"):
        run_with_prompt_loras(ours, GenerationRequest(prompt="<lora:nope>"), tmp_path / "loras", ours.run)


def test_cli_lora_options(sd1, tmp_path):
    from t2i.cli import main
    from t2i.imageio import parse_parameters

    folder, ref, _ours = sd1
    (tmp_path / "loras").mkdir()
    write_kohya_lora(ref, "sd1", tmp_path / "loras" / "ink.safetensors")
    common = ["--model", str(folder), "--steps", "2", "--seed", "1", "--width", "16", "--height", "16",
              "--sampler", "euler", "--precision", "fp32", "--quiet"]
    out = tmp_path / "tag.png"
    assert main(["generate", "a circle <lora:ink:0.5>", "--lora-dir", str(tmp_path / "loras"), "--out", str(out),
                 *common]) == 0
    from PIL import Image

    assert parse_parameters(Image.open(out).info["parameters"])["prompt"] == "a circle <lora:ink:0.5>"
    file_out = tmp_path / "file.png"
    lora_file = f"{tmp_path / 'loras' / 'ink.safetensors'}:0.5"
    assert main(["generate", "a circle ", "--lora", lora_file, "--out", str(file_out), *common]) == 0
    plain = tmp_path / "plain.png"
    assert main(["generate", "a circle ", "--out", str(plain), *common]) == 0
    pixels = [torch.tensor(list(Image.open(p).getdata()), dtype=torch.float32) for p in (out, file_out, plain)]
    assert torch.equal(pixels[0], pixels[1])  # the tag and --lora give the same image
    assert (pixels[0] - pixels[2]).abs().max() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["generate", "a circle <lora:ink>", "--out", str(tmp_path / "x.png"), *common]) != 0


@pytest.mark.parametrize("layout", ["lora.down", "processor"])
def test_older_diffusers_layouts_merge_as_peft(sd1, tmp_path, layout):
    """diffusers' layouts before PEFT (`.lora.down.weight`; attention processors' `to_q_lora`) with
    `.alpha` keys give the same merged weights as the PEFT file they are renamed from."""
    from safetensors.torch import load_file

    _folder, ref, ours = sd1
    peft = write_peft_lora(ref, "sd1", tmp_path / "peft")
    with apply_loras(ours, [(peft, 0.8)]):
        expected = _snapshot(ours)
    old = {}
    for key, value in load_file(peft).items():
        module, _, part = key.rpartition(".lora_")
        if layout == "processor":  # only attention projections had processors
            head, _, proj = module.removesuffix(".0").rpartition(".")
            if not module.startswith("unet.") or proj not in ("to_q", "to_k", "to_v", "to_out"):
                continue
            module = f"{head}.processor.{proj}_lora"
        old[f"{module}.lora.{'down' if part.startswith('A') else 'up'}.weight"] = value
        old[f"{module}.alpha"] = torch.tensor(8.0 if module.startswith("unet.") else 2.0)
    path = tmp_path / "old.safetensors"
    save_file(old, path)
    base = _snapshot(ours)
    with apply_loras(ours, [(path, 0.8)]):
        got = _snapshot(ours)
    changed = [k for k in base if not torch.equal(base[k], got[k])]
    assert changed and (layout == "lora.down" or all("attn" in k for k in changed))
    assert all(torch.equal(got[k], expected[k]) for k in changed)
    _assert_restored(ours, base)


def test_a_lora_applies_to_the_layout_model_whose_extra_layers_keep_their_t2i_names(tmp_path):
    from t2i.adapters.lora import LoraLayer, apply_loras, write_lora
    from t2i.systems.registry import system

    fam = system("shapes_layout")
    pipe = fam.load(fam.write_tiny(tmp_path, 0))
    torch.manual_seed(0)
    conv_in, layout_in = pipe.unet.conv_in.weight, pipe.unet.layout_in.weight
    layers = {name: LoraLayer(torch.randn(2, *w.shape[1:]), torch.randn(w.shape[0], 2, 1, 1), 2.0)
              for name, w in (("lora_unet_input_blocks_0_0", conv_in), ("lora_unet_layout_in", layout_in))}
    path = write_lora(tmp_path / "layout_lora.safetensors", layers)
    before = {k: v.clone() for k, v in ((1, conv_in), (2, layout_in))}
    handle = apply_loras(pipe, [(path, 0.5)])
    for k, w, layer in ((1, pipe.unet.conv_in.weight, layers["lora_unet_input_blocks_0_0"]),
                        (2, pipe.unet.layout_in.weight, layers["lora_unet_layout_in"])):
        torch.testing.assert_close(w.detach(), before[k] + 0.5 * layer.delta().view_as(w), rtol=1e-5, atol=1e-6)
    handle.unmerge()
    torch.testing.assert_close(pipe.unet.layout_in.weight.detach(), before[2])
