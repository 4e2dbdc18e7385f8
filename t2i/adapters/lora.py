"""LoRA files (kohya / AUTOMATIC1111 and diffusers / PEFT) merged into a pipeline's weights.

A LoRA holds, for some Linear or Conv2d layers W (out, in[, kh, kw]), a low-rank update
(Hu et al. 2021, "LoRA", eq. 3: h = W0 x + B A x):

    W' = W + m * s * up @ down,    s = alpha / r

down = A (r, in[, kh, kw]), up = B (out, r[, 1, 1]), r the rank, m the user's weight (`--lora
FILE:0.8`, `<lora:name:0.8>`). alpha comes from the file: a `.alpha` tensor per layer (kohya), or
`lora_alpha` / `alpha_pattern` in the `lora_adapter_metadata` that diffusers writes into the
safetensors header; alpha = r (s = 1) when the file has neither, as kohya and diffusers assume.
LoCon convolution layers have the same form: down a (r, in, kh, kw) convolution (3x3 too) and up
a 1x1 one, whose product is again an (out, in, kh, kw) kernel.

Key layouts read (one file may mix them):
- kohya / A1111: `lora_unet_<module>`, `lora_te_<module>` (SD 1.x/2.x), `lora_te1_`/`lora_te2_` (SDXL)
  with `.lora_down.weight`, `.lora_up.weight`, `.alpha`; <module> is the module path with `.` written
  `_`, in diffusers' U-Net names (SD 1.x) or the original ones (`input_blocks_4_1_...`, SDXL), and
  transformers' CLIP names for the text encoders.
- diffusers / PEFT: `unet.<module>`, `text_encoder.<module>`, `text_encoder_2.<module>` with
  `.lora_A.weight`/`.lora_B.weight`, `.lora.down.weight`/`.lora.up.weight`, or the older
  `.processor.to_q_lora.down.weight` of diffusers' attention processors.
Names are looked up, not parsed: every Linear/Conv2d of the pipeline is listed under each name a
file may give it (`lora_targets`), so `_` in kohya names is never ambiguous.

Why merging (the default, and the only mode so far): on a CPU every layer is bound by its matrix
product, so applying a LoRA on the fly adds two skinny products (and their memory traffic and
calls) to every touched layer at every step of every image; merged, the sampler runs the plain
network, with zero per-step cost. The price is paid once per request: one (out x r x in) product per
layer and a copy of each touched weight, kept so that unmerging restores the original tensors
bit-exactly (subtracting the update again would leave float rounding behind).

Keys that match no layer are an error that names them (LoraError), not a warning: a LoRA applied
in part gives a plausible but wrong image that nobody would trace back to the missing layers.
`strict=False` downgrades them to one warning that lists them, for a file one wants to use anyway.
A LoRA for another architecture is refused by name: SDXL's two text encoders (`lora_te1_`,
`text_encoder_2.`) on a one-encoder model and back, or layers whose shapes differ from the model's.
"""

from __future__ import annotations

import math
import os
import re
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.checkpoints.io import (
    CheckpointError,
    check_safetensors_header,
    load_state_dict,
    parse_json,
    save_state_dict,
)
from t2i.checkpoints.sd_keys import unet_module_pairs, unet_to_original
from t2i.checkpoints.transformers_text import clip_state_dict_to_transformers
from t2i.text.encoders import CLIPTextEncoder, SDXLTextEncoder

LoraSpec = tuple[str | os.PathLike, float]  # (file, weight m)


class LoraError(ValueError):
    """A LoRA that cannot be applied; the message names the file and the keys or layers at fault."""


# ============================================================================ reading files

# Key suffix -> which part of a layer it holds. Longest first: `.lora.down.weight` before `.down.weight`.
_PARTS = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".alpha", "alpha"),
)
# diffusers' attention-processor LoRA (before PEFT): `<attention>.processor.to_q_lora` is `<attention>.to_q`.
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
# Other adapter kinds found in LoRA folders, named when refused rather than reported as unknown keys.
_OTHER_KINDS = (("lora_mid", "Tucker-decomposed LoCon (lora_mid)"), ("hada_", "LoHa"), ("lokr_", "LoKr"),
                ("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), ("lora_B.bias", "LoRA with biases"),
                (".diff", "full weight differences"))
# The components a diffusers / PEFT key starts with.
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoraLayer:
    """One layer's update. down: (r, in[, kh, kw]); up: (out, r[, 1, 1]); scale: alpha / r."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    scale: float = 1.0

    def shape(self) -> tuple[int, ...]:
        """The shape of the weight this layer updates, as (out, in[, kh, kw])."""
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self) -> torch.Tensor:
        """s * up @ down as a float32 (out, in[, kh, kw]) weight update."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()  # (out, in * kh * kw)
        return (product * self.scale).reshape(self.shape())


def read_lora(path: str | os.PathLike) -> tuple[dict[str, LoraLayer], list[str]]:
    """A LoRA file -> ({layer name as the file spells it: LoraLayer}, keys that are no LoRA part).

    Only `.safetensors` files are read (through t2i's checked loader): LoRAs are shared in that
    format, and a pickle is no place for a download of unknown origin."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: LoRA files are read as .safetensors only (got {path.suffix or 'no suffix'!r})")
    try:
        meta = check_safetensors_header(path).get("__metadata__", {}) if path.is_file() else {}
        state = load_state_dict(path)
    except CheckpointError as e:
        raise LoraError(str(e)) from None
    layers: dict[str, LoraLayer] = {}
    other: list[str] = []
    for key, tensor in state.items():
        for suffix, part in _PARTS:
            if key.endswith(suffix):
                name = _PROCESSOR.sub(lambda m: f".{m.group(1)}" + (".0" if m.group(1) == "to_out" else ""),
                                      key[: -len(suffix)])
                layer = layers.setdefault(name, LoraLayer())
                if part == "alpha":
                    layer.alpha = float(tensor)
                else:
                    setattr(layer, part, tensor)
                break
        else:
            other.append(key)
    kinds = sorted({kind for key in other for marker, kind in _OTHER_KINDS if marker in key})
    if kinds:
        raise LoraError(f"{path}: {', '.join(kinds)} layers are not supported (only LoRA / LoCon down-up pairs), "
                        f"e.g. {[k for k in other if any(m in k for m, _ in _OTHER_KINDS)][:3]}")
    incomplete = [n for n, layer in layers.items() if layer.down is None or layer.up is None]
    if incomplete:
        raise LoraError(f"{path}: {len(incomplete)} layers lack their down or up weight, e.g. {incomplete[:3]}")
    _set_scales(layers, _peft_configs(meta, path))
    return layers, other


def write_lora(path: str | os.PathLike, layers: dict[str, LoraLayer], metadata: dict[str, str] | None = None) -> Path:
    """Write `{kohya name: LoraLayer}` in the kohya / A1111 layout (`<name>.lora_down.weight`,
    `.lora_up.weight`, `.alpha`; see `NamedLayer.kohya`), float32, atomically: the layout A1111,
    ComfyUI, kohya's scripts and diffusers' `load_lora_weights` all read. Returns the path."""
    state = {}
    for name, layer in layers.items():
        r = layer.down.shape[0]
        state[f"{name}.lora_down.weight"] = layer.down.detach().float()  # (r, in[, kh, kw])
        state[f"{name}.lora_up.weight"] = layer.up.detach().float()  # (out, r[, 1, 1])
        state[f"{name}.alpha"] = torch.tensor(float(r if layer.alpha is None else layer.alpha))
    save_state_dict(state, path, metadata)
    return Path(path)


def _peft_configs(meta: dict[str, str], path: Path) -> dict[str, dict[str, Any]]:
    """diffusers' `lora_adapter_metadata` (one JSON object of `<component>.<LoraConfig field>`) ->
    {component: LoraConfig fields}; {} when the file has none."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    fields = parse_json(raw, f"{path}: lora_adapter_metadata")
    if not isinstance(fields, dict):
        raise LoraError(f"{path}: lora_adapter_metadata is not a JSON object")
    out: dict[str, dict[str, Any]] = {}
    for key, value in fields.items():
        component, _, name = key.partition(".")
        out.setdefault(component, {})[name] = value
    return out


def _pattern_value(patterns: dict[str, Any], module: str) -> Any:
    """PEFT's rank/alpha pattern lookup: a pattern applies to the modules whose path ends with it."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _set_scales(layers: dict[str, LoraLayer], configs: dict[str, dict[str, Any]]) -> None:
    """s = alpha / r for every layer (alpha / sqrt(r) for PEFT's rsLoRA)."""
    for name, layer in layers.items():
        r = layer.down.shape[0]
        alpha, root = layer.alpha, False
        component, _, module = name.partition(".")
        cfg = configs.get(component)
        if alpha is None and cfg is not None:
            alpha = _pattern_value(cfg.get("alpha_pattern"), module)
            alpha = cfg.get("lora_alpha") if alpha is None else alpha
            root = bool(cfg.get("use_rslora"))
        layer.scale = (alpha if alpha is not None else r) / (math.sqrt(r) if root else r)


# ============================================================================ the pipeline's layers


@dataclass(frozen=True)
class Target:
    """A layer a LoRA may update. where: its path in t2i (`unet.down_blocks.0...`), for messages."""

    where: str
    module: nn.Module


def _layers(net: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _renamed(names: Iterable[str], rename) -> dict[str, str]:
    """{t2i module name: foreign name} through a state-dict key map run on placeholder keys."""
    placeholders = {f"{n}.weight": torch.empty(0, device="meta") for n in names}
    back = {id(t): k.removesuffix(".weight") for k, t in placeholders.items()}
    return {back[id(t)]: k.removesuffix(".weight") for k, t in rename(placeholders).items()}


def _original_unet_names(layers: dict[str, nn.Module], cfg: Any) -> dict[str, str]:
    """{t2i U-Net layer name: its name in the original SD layout}. The modules that layout lacks (the
    layout renderer's phrase_proj and layout_in) keep their t2i names: a LoRA file names them so."""
    known = {pair[1].split(".")[0] for pair in unet_module_pairs(cfg)}  # top-level modules of the SD layout
    sd = [n for n in layers if n.split(".")[0] in known]
    return _renamed(sd, lambda s: unet_to_original(s, cfg)) | {n: n for n in layers if n.split(".")[0] not in known}


def text_towers(pipe: Any) -> list[nn.Module]:
    """The CLIP towers of a pipeline's text encoder, in diffusers' order (text_encoder, text_encoder_2)."""
    enc = getattr(pipe, "text_encoder", None)
    if isinstance(enc, SDXLTextEncoder):
        return [e.model for e in enc.encoders]
    if isinstance(enc, CLIPTextEncoder):
        return [enc.model]
    return []


@dataclass(frozen=True)
class NamedLayer:
    """A layer a LoRA may update, under the names files give it.

    diffusers: `<component>.<module>` in diffusers' and transformers' names (`unet.down_blocks...`,
    `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`), what a target pattern is matched on.
    kohya: the one name kohya's trainers write for it (and so `write_lora`): `lora_unet_` + the U-Net's
    diffusers name (SD 1.x/2.x) or original name (SDXL, as kohya's SDXL trainer writes), `lora_te_` /
    `lora_te1_` / `lora_te2_` + the CLIP name with `text_model.`.
    spellings: every name a file may give it (`lora_targets`)."""

    target: Target
    diffusers: str
    kohya: str
    spellings: tuple[str, ...]


def named_layers(pipe: Any) -> list[NamedLayer]:
    """Every Linear/Conv2d of `pipe`'s U-Net and CLIP text encoders a LoRA may update (see NamedLayer)."""
    if not isinstance(getattr(pipe, "unet", None), nn.Module):
        raise LoraError(f"{getattr(pipe, 'name', 'this model')}: LoRAs apply to U-Net latent diffusion models; "
                        "this one has no U-Net")
    out: list[NamedLayer] = []
    unet_layers = _layers(pipe.unet)
    original = _original_unet_names(unet_layers, pipe.unet.cfg)
    sdxl = isinstance(getattr(pipe, "text_encoder", None), SDXLTextEncoder)
    for name, module in unet_layers.items():
        spellings = (f"unet.{name}", "lora_unet_" + name.replace(".", "_"),
                     "lora_unet_" + original[name].replace(".", "_"))
        out.append(NamedLayer(Target(f"unet.{name}", module), f"unet.{name}", spellings[2 if sdxl else 1], spellings))
    towers = text_towers(pipe)
    slots = [("text_encoder", "lora_te_")] if len(towers) == 1 else [("text_encoder", "lora_te1_"),
                                                                      ("text_encoder_2", "lora_te2_")]
    for (component, kohya), tower in zip(slots, towers, strict=False):
        tower_layers = _layers(tower)
        foreign = _renamed(tower_layers, clip_state_dict_to_transformers)
        for name, module in tower_layers.items():
            full = "text_model." + foreign[name].removeprefix("text_model.")
            spelled = sorted({foreign[name], foreign[name].removeprefix("text_model.")})
            spellings = tuple(s for one in spelled for s in (f"{component}.{one}", kohya + one.replace(".", "_")))
            out.append(NamedLayer(Target(f"{component}.{name}", module), f"{component}.{full}",
                                  kohya + full.replace(".", "_"), spellings))
    return out


def lora_targets(pipe: Any) -> dict[str, Target]:
    """Every name a LoRA file may give a layer of `pipe` (kohya and diffusers/PEFT spellings, the
    U-Net's diffusers and original names, CLIP's transformers names with and without `text_model.`)
    -> the layer."""
    return {spelled: layer.target for layer in named_layers(pipe) for spelled in layer.spellings}


def _check_architecture(path: Path, names: list[str], towers: int, model: str) -> None:
    """Refuse, by name, a LoRA whose text-encoder keys are for another number of encoders."""
    two = [n for n in names if n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2."))]
    one = [n for n in names if n.startswith("lora_te_")]
    if two and towers != 2:
        raise LoraError(f"{path}: an SDXL LoRA (keys for two text encoders, e.g. {two[0]!r}) cannot be applied "
                        f"to {model}, which has {towers or 'no'} CLIP text encoder{'s' if towers != 1 else ''}")
    if one and towers == 2:
        raise LoraError(f"{path}: a LoRA for a one-text-encoder model (SD 1.x/2.x: `lora_te_` keys, e.g. "
                        f"{one[0]!r}) cannot be applied to {model}, an SDXL model with two text encoders")


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A weight shape with a 1x1 kernel dropped: a 1x1 LoCon update fits a Linear and back."""
    return shape[:2] if shape[2:] == (1, 1) else shape


def _fits(layer: LoraLayer, weight: torch.Tensor) -> bool:
    return (layer.up.shape[1] == layer.down.shape[0] and layer.up.shape[2:] in ((), (1, 1))
            and _squeezed(layer.shape()) == _squeezed(tuple(weight.shape)))


def lora_updates(pipe: Any, loras: Iterable[LoraSpec], strict: bool = True) -> dict[nn.Module, torch.Tensor]:
    """The summed update sum_i m_i * s_i * up_i @ down_i of every layer the LoRAs touch, float32 in
    each weight's shape; every file is read and checked before anything is returned."""
    targets = lora_targets(pipe)
    towers = len(text_towers(pipe))
    model = f"{getattr(pipe, 'name', 'the model')} ({getattr(pipe, 'family', 'unknown family')})"
    updates: dict[nn.Module, torch.Tensor] = {}
    for path, weight in loras:
        path = Path(path)
        layers, other = read_lora(path)
        _check_architecture(path, list(layers), towers, model)
        unmatched = other + [n for n in layers if n not in targets]
        wrong = [f"{targets[n].where}: LoRA {layer.shape()} vs model {tuple(targets[n].module.weight.shape)}"
                 for n, layer in layers.items() if n in targets and not _fits(layer, targets[n].module.weight)]
        if wrong:
            raise LoraError(f"{path}: {len(wrong)} of {len(layers)} layers do not fit {model}, e.g. {wrong[:3]}: "
                            "a LoRA for another architecture (SD 1.x, SD 2.x and SDXL differ in widths)?")
        if unmatched:
            message = (f"{path}: {len(unmatched)} of {len(layers) + len(other)} LoRA keys match no layer of "
                       f"{model}: {unmatched[:10]}{' ...' if len(unmatched) > 10 else ''}")
            if strict:
                raise LoraError(message + " (a LoRA for another architecture? strict=False applies the rest)")
            warnings.warn(message + "; applying the rest", stacklevel=3)
        for name, layer in layers.items():
            if name in targets:
                module = targets[name].module
                delta = (weight * layer.delta()).reshape(module.weight.shape)
                updates[module] = updates[module] + delta if module in updates else delta
    return updates


# ============================================================================ merging

# The handles merged into each U-Net, oldest first: unmerging restores kept tensors, which is only
# right in the reverse order of merging.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, list[LoraHandle]] = weakref.WeakKeyDictionary()


class LoraHandle:
    """LoRAs merged into a pipeline; `unmerge()` (or leaving the `with` block) restores the original
    weights bit-exactly. Handles on one pipeline unmerge in the reverse order they were applied."""

    def __init__(self, owner: nn.Module, originals: list[tuple[nn.Parameter, torch.Tensor]],
                 loras: list[tuple[Path, float]]) -> None:
        self.owner, self.loras = owner, loras
        self._originals: list[tuple[nn.Parameter, torch.Tensor]] | None = originals
        _ACTIVE.setdefault(owner, []).append(self)

    @property
    def layers(self) -> int:
        """How many weights this handle changed (0 once unmerged)."""
        return len(self._originals or [])

    def unmerge(self) -> None:
        if self._originals is None:
            return
        stack = _ACTIVE.get(self.owner, [])
        if stack[-1] is not self:
            raise LoraError("unmerge LoRAs in the reverse order they were applied (a later handle is still merged)")
        with torch.no_grad():
            for param, original in self._originals:
                param.copy_(original)
        stack.pop()
        self._originals = None

    def __enter__(self) -> LoraHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmerge()


def apply_loras(pipe: Any, loras: Iterable[LoraSpec], strict: bool = True) -> LoraHandle:
    """Merge LoRA files, each with its weight m, into `pipe`'s U-Net and CLIP text encoders.

    `with apply_loras(pipe, [("style.safetensors", 0.8)]): pipe(...)` unmerges on leaving. Every
    file is read and checked first: on any LoraError nothing has changed. Weights are updated in
    place (in float32, then cast back to the weight's dtype), so modules holding them see the change.
    """
    if getattr(pipe, "_compiled_unet", None) is not None:
        raise LoraError(f"{getattr(pipe, 'name', 'the model')}: apply LoRAs before compile(): the compiled U-Net "
                        "holds its weights frozen")
    from t2i.quantize import int8_layers

    if int8_layers(pipe.unet):
        raise LoraError(f"{getattr(pipe, 'name', 'the model')}: its U-Net is int8 and a LoRA merges into float "
                        "weights: load it with precision fp32 or bf16 (`auto` does so when LoRAs are given)")
    loras = [(Path(p), float(w)) for p, w in loras]
    updates = lora_updates(pipe, loras, strict)
    originals = []
    with torch.no_grad():
        for module, delta in updates.items():
            weight = module.weight
            originals.append((weight, weight.detach().clone()))
            weight.copy_((weight.float() + delta).to(weight.dtype))
    return LoraHandle(pipe.unet, originals, loras)


# ============================================================================ prompts and the CLI

# A1111's extra-network tag: <lora:name>, <lora:name:m> or <lora:name:m_te:m_unet>.
LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*){0,2})>")


def prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's `<lora:name:0.8>` tags -> (the prompt without them, [(name, weight)]). A1111 removes
    the tag and encodes the rest as it stands; so do we. Separate text-encoder and U-Net weights
    (`<lora:name:a:b>`) are refused unless equal: a merge here applies one weight to both."""
    found: list[tuple[str, float]] = []
    for m in LORA_TAG.finditer(prompt):
        values = [v.strip() for v in m.group(2).split(":")[1:]]
        try:
            weights = [float(v) for v in values] or [1.0]
        except ValueError:
            raise LoraError(f"{m.group(0)}: the weight must be a number") from None
        if len(set(weights)) > 1:
            raise LoraError(f"{m.group(0)}: separate text-encoder and U-Net weights are not supported")
        found.append((m.group(1).strip(), weights[0]))
    return LORA_TAG.sub("", prompt), found


def find_lora(name: str, lora_dir: str | os.PathLike | None) -> Path:
    """The `.safetensors` file a prompt tag names: A1111 finds `<lora:name>` by file stem anywhere
    under its Lora folder (subfolders too)."""
    if lora_dir is None:
        raise LoraError(f"<lora:{name}> in the prompt needs a LoRA folder (--lora-dir DIR)")
    folder = Path(lora_dir)
    if not folder.is_dir():
        raise LoraError(f"LoRA folder not found: {folder}")
    found = sorted(p for p in folder.rglob("*.safetensors") if p.stem == name)
    if not found:
        raise LoraError(f"<lora:{name}>: no {name}.safetensors under {folder}")
    if len(found) > 1:
        raise LoraError(f"<lora:{name}>: several files match under {folder}: {[str(p) for p in found]}")
    return found[0]


def parse_lora_arg(text: str) -> LoraSpec:
    """`FILE[:WEIGHT]` -> (FILE, WEIGHT or 1.0); a colon not followed by a number belongs to the path."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def run_with_prompt_loras(pipe: Any, request: Any, lora_dir: str | os.PathLike | None, run) -> Any:
    """`run(request)` with the LoRAs that `request.prompt`'s tags name merged for this run only.

    The networks see the prompt without the tags; each image's PNG `parameters` keep the prompt as
    written, tags included, as A1111 writes it, so the image reproduces from its parameters."""
    from dataclasses import replace

    if not isinstance(request.prompt, str):  # a batch of prompts: tags would have to agree; not needed yet
        if any(LORA_TAG.search(p) for p in request.prompt):
            raise LoraError("<lora:...> tags are read in a single prompt, not a batch of prompts")
        return run(request)
    prompt, tags = prompt_loras(request.prompt)
    if not tags:
        return run(request)
    with apply_loras(pipe, [(find_lora(name, lora_dir), w) for name, w in tags]):
        result = run(replace(request, prompt=prompt))
    return keep_tags(result, [request.prompt] * len(result.images), [prompt] * len(result.images))


def keep_tags(result: Any, tagged: list[str], untagged: list[str]) -> Any:
    """Each image's PNG `parameters` with its prompt as written (`tagged`, one per image) in place of
    the prompt the networks saw (`untagged`), as A1111 writes them, so the image reproduces."""
    for image, with_tags, without in zip(result.images, tagged, untagged, strict=True):
        text = image.info.get("parameters")
        if text is not None and text.startswith(without):
            image.info["parameters"] = with_tags + text[len(without):]
    return result
