"""`t2i convert SRC DST` round trips keep every weight bit-exact (issue 3).

folder -> single file -> folder and single file -> folder -> single file, through the CLI, on
tiny random SD1/SD2/SDXL diffusers folders; the exported folder is read by diffusers'
`from_pretrained` with identical weights, and generates exactly what the source generates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from sd_oracles import BUILDERS

import t2i
from t2i.checkpoints.diffusers_nets import unet_config_from_diffusers, vae_config_from_diffusers
from t2i.checkpoints.diffusers_scheduler import read_scheduler_config
from t2i.checkpoints.io import load_component_weights, load_state_dict, save_state_dict
from t2i.checkpoints.single_file_config import METADATA_KEY
from t2i.checkpoints.transformers_text import clip_state_dict_from_transformers
from t2i.cli import main
from t2i.text.clip_tokenizer import CLIPTokenizer

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module", params=list(BUILDERS))
def converted(request, tmp_path_factory):
    """(family, diffusers pipeline, source folder, file, folder back from the file)."""
    root = tmp_path_factory.mktemp(f"convert_{request.param}")
    reference = BUILDERS[request.param](root / "src")
    assert main(["convert", str(root / "src"), str(root / "model.safetensors")]) == 0
    assert main(["convert", str(root / "model.safetensors"), str(root / "back")]) == 0
    return request.param, reference, root / "src", root / "model.safetensors", root / "back"


def _components(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("unet", "vae", "text_encoder")))


def _weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    state = load_component_weights(folder / part, "model" if part.startswith("text") else "diffusion_pytorch_model")
    # transformers >= 5.6 saves CLIPTextModel flat, we write `text_model.`: compare in one naming
    return clip_state_dict_from_transformers(state) if part.startswith("text") else state


def _assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{what} {k}: dtype {a[k].dtype} != {b[k].dtype}"
        assert torch.equal(a[k], b[k]), f"{what} {k}: values differ"


def test_folder_file_folder_is_bit_exact(converted):
    family, _reference, src, _file, back = converted
    assert _components(back) == _components(src)
    for part in _components(src):
        _assert_equal_states(_weights(src, part), _weights(back, part), f"{family} {part}")
    for part, read in (("unet", unet_config_from_diffusers), ("vae", vae_config_from_diffusers)):
        configs = [read(json.loads((f / part / "config.json").read_text())) for f in (src, back)]
        assert configs[0] == configs[1]
    assert read_scheduler_config(src) == read_scheduler_config(back)
    src_index = json.loads((src / "model_index.json").read_text())
    back_index = json.loads((back / "model_index.json").read_text())
    assert back_index["_class_name"] == src_index["_class_name"]
    assert back_index.get("force_zeros_for_empty_prompt") == src_index.get("force_zeros_for_empty_prompt")
    prompt = ["a red circle, above: a blue square!"]
    for tok in (p.name for p in src.iterdir() if p.name.startswith("tokenizer")):
        a, b = CLIPTokenizer.from_folder(src / tok), CLIPTokenizer.from_folder(back / tok)
        assert a.pad_token == b.pad_token
        assert torch.equal(a.tokenize(prompt).ids, b.tokenize(prompt).ids)


def test_file_folder_file_is_bit_exact(converted, tmp_path):
    _family, _reference, _src, file, back = converted
    again = tmp_path / "again.safetensors"
    assert main(["convert", str(back), str(again)]) == 0
    _assert_equal_states(load_state_dict(file), load_state_dict(again), "single file")
    meta = [safe_open(f, "pt").metadata()[METADATA_KEY] for f in (file, again)]
    assert json.loads(meta[0]) == json.loads(meta[1])


def test_half_precision_is_kept(converted, tmp_path):
    """No cast on the way: an fp16 file stays fp16, bit for bit, through a folder and back."""
    _family, _reference, _src, file, _back = converted
    half = tmp_path / "half.safetensors"
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    save_state_dict({k: v.half() for k, v in load_state_dict(file).items()}, half, metadata)
    assert main(["convert", str(half), str(tmp_path / "folder")]) == 0
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "again.safetensors")]) == 0
    _assert_equal_states(load_state_dict(half), load_state_dict(tmp_path / "again.safetensors"), "fp16 file")


def test_diffusers_reads_the_exported_folder(converted):
    """The folder we write is a real diffusers folder: from_pretrained gives the same weights."""
    family, reference, _src, _file, back = converted
    loaded = type(reference).from_pretrained(str(back), local_files_only=True)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ref = getattr(reference, part, None)
        if ref is None:
            continue
        a, b = ref.state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys(), f"{family} {part}"
        assert all(torch.equal(a[k], b[k]) for k in a), f"{family} {part}"
    assert type(loaded.scheduler).__name__ == type(reference.scheduler).__name__


def test_converted_models_generate_the_same_latents(converted):
    family, _reference, src, file, back = converted
    kwargs = dict(seed=2, steps=3, guidance=4.0, sampler="euler", width=16, height=16)
    latents = [t2i.load(p).generate("a green triangle", **kwargs).latents for p in (src, file, back)]
    assert torch.equal(latents[0], latents[1]), family
    assert torch.equal(latents[0], latents[2]), family


def test_convert_errors_are_one_line(converted, tmp_path, capsys):
    _family, _reference, src, file, back = converted
    assert main(["convert", str(file), str(back)]) == 2  # never overwrites
    assert main(["convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "x")]) == 2
    assert main(["convert", str(src), str(tmp_path / "y.safetensors"), "--prediction", "epsilon"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("t2i convert: error: ") for line in err)
    assert "exists" in err[0] and "missing.safetensors" in err[1] and "single-file" in err[2]
