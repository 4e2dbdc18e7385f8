"""A1111's "extra networks" in the server: `<lora:name:w>` prompt tags resolved against the LoRA
folder (`--lora-dir`) when a request arrives, and the listings A1111's clients read
(`/sdapi/v1/loras`, `/sdapi/v1/embeddings`).

A tag is resolved to its file at submit time, so an unknown name is a 422 before the job is queued;
the job carries the files, and the worker merges them around its batch's run (t2i.serve.jobs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from t2i.adapters.embeddings import embedding_files, load_embedding_dir, read_embedding
from t2i.adapters.lora import LoraError, find_lora, prompt_loras
from t2i.checkpoints.io import CheckpointError, check_safetensors_header
from t2i.serve.schemas import FieldError

LoraSet = tuple[tuple[Path, float], ...]  # (file, weight) in the prompt's order: merge order is part of the result


def prompt_lora_files(prompt: str, lora_dir: str | os.PathLike | None) -> LoraSet:
    """The LoRA files and weights `prompt`'s tags name (() without tags). FieldError on `prompt`,
    naming the tag, for a name not under `lora_dir`, a tag without a LoRA folder or a bad weight."""
    try:
        _, tags = prompt_loras(prompt)
        return tuple((find_lora(name, lora_dir), weight) for name, weight in tags)
    except LoraError as e:
        raise FieldError("prompt", str(e)) from None


def _metadata(path: Path) -> dict[str, Any]:
    """A LoRA file's safetensors metadata as A1111 lists it: values that hold JSON objects parsed
    (kohya writes its training settings that way); {} for a file whose header cannot be read."""
    try:
        meta = check_safetensors_header(path).get("__metadata__") or {}
    except (CheckpointError, OSError):
        return {}
    out: dict[str, Any] = {}
    for key, value in meta.items():
        try:
            out[key] = json.loads(value) if isinstance(value, str) and value.startswith("{") else value
        except ValueError:
            out[key] = value
    return out


def lora_listing(lora_dir: str | os.PathLike | None) -> list[dict[str, Any]]:
    """`/sdapi/v1/loras`: every `.safetensors` under the folder (subfolders too, as `find_lora`
    searches), in A1111's shape: name (what a tag names), alias (kohya's `ss_output_name`), path, metadata."""
    if lora_dir is None or not Path(lora_dir).is_dir():
        return []
    out = []
    for path in sorted(Path(lora_dir).rglob("*.safetensors")):
        meta = _metadata(path)
        out.append({"name": path.stem, "alias": meta.get("ss_output_name", path.stem), "path": str(path),
                    "metadata": meta})
    return out


def load_embedding_listing(pipe: Any, folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Add every embedding under `folder` to `pipe` (`load_embedding_dir`: those for another model
    family are skipped with a warning) and return `/sdapi/v1/embeddings`'s answer, A1111's shape:
    {"loaded": {name: {...}}, "skipped": {name: {...}}}; `shape` is the vector width (summed over
    SDXL's two encoders), `vectors` the number of tokens the word takes (summed likewise, as A1111)."""
    loaded = set(load_embedding_dir(pipe, folder).names)
    listing: dict[str, dict[str, Any]] = {"loaded": {}, "skipped": {}}
    for path in embedding_files(folder):  # read again: the handle keeps only the names
        emb = read_embedding(path)
        entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                 "shape": sum(v.shape[1] for v in emb.vectors.values()),
                 "vectors": sum(len(v) for v in emb.vectors.values())}
        listing["loaded" if emb.name in loaded else "skipped"][emb.name] = entry
    return listing
