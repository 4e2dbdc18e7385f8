"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word") added to a pipeline's
CLIP text encoders, used by name in the prompt as AUTOMATIC1111 does.

An embedding is n learned input vectors (n, D) standing for one word: the file's stem (A1111's rule;
the `name` stored inside A1111 files is ignored, as A1111 ignores it). Each vector becomes a new row of
the token embedding; wherever a prompt holds the word's own CLIP tokens, the tokenizer puts the n new
ids instead (t2i.text.clip_tokenizer), so an n-vector embedding takes n of the 75 tokens of a chunk and
carries its piece's emphasis weight, as in A1111.

Files read (the formats A1111's `create_embedding_from_data` and diffusers' `load_textual_inversion`
accept):
- A1111 `.pt`: `{"string_to_param": {"*": (n, D)}, "name": ..., "step": ...}`, read with
  `torch.load(weights_only=True)`, which refuses any pickle that imports or calls something;
- `.safetensors` (kohya, A1111 exports): one tensor, usually `emb_params`;
- diffusers `learned_embeds.safetensors` / `.bin`: `{token: (D,) or (n, D)}`; a file still named
  `learned_embeds` (diffusers' fixed name, which says nothing) takes the token stored in it as its word;
- SDXL: `{"clip_l": (n, 768), "clip_g": (n, 1280)}`, clip_l for the first text encoder, clip_g for the
  second (the refiner, which has only the second, uses clip_g alone).

Refused, by name: an embedding whose width is not the encoder's (an SD 2.x embedding, D = 1024, on
SD 1.x, D = 768; an SD 1.x one on SDXL), an SDXL embedding on a one-encoder model and back, and a
name that clashes, i.e. one CLIP token on its own (a vocabulary word such as `cat`: every prompt using
the word would silently get the embedding instead) or the same tokens as another loaded embedding
(`Style.pt` and `style.pt`). Clashing names are refused, not renamed: a renamed trigger word is one the
user does not know to type. Loading a folder (`load_embedding_dir`, the CLI's `--embedding-dir`) skips,
with one warning naming each, the embeddings made for another model family, because A1111 users keep
SD 1.x and SDXL embeddings in one folder; every other problem is still an error.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from t2i.checkpoints.io import CheckpointError, check_finite, load_pickle, load_state_dict
from t2i.text.encoders import CLIPTextEncoder, SDXLTextEncoder

SUFFIXES = (".pt", ".bin", ".safetensors")
SDXL_KEYS = ("clip_l", "clip_g")  # the two encoders' vectors in an SDXL embedding, in encoder order
SINGLE = "*"  # key of a one-encoder embedding's vectors (A1111's `string_to_param` key)
DIFFUSERS_NAME = "learned_embeds"


class EmbeddingError(ValueError):
    """An embedding that cannot be read or added; the message names the file and the reason."""


class FamilyMismatch(EmbeddingError):
    """An embedding made for another model family (widths or encoder count differ)."""


@dataclass
class Embedding:
    """One file's vectors. vectors: {SINGLE: (n, D)} or {"clip_l": (n, D1), "clip_g": (n, D2)}, float32."""

    name: str
    vectors: dict[str, torch.Tensor]
    path: Path

    @property
    def n(self) -> int:
        """Vectors per encoder: how many tokens the word takes in a prompt."""
        return len(next(iter(self.vectors.values())))

    def widths(self) -> str:
        """The widths in words, for messages: `768` or `clip_l 768 + clip_g 1280`."""
        if SINGLE in self.vectors:
            return str(self.vectors[SINGLE].shape[1])
        return " + ".join(f"{k} {v.shape[1]}" for k, v in self.vectors.items())


# ============================================================================ reading files


def _read_pickle(path: Path) -> Any:
    """A pickled embedding, whole (A1111 nests its tensors in `string_to_param`, which the weight
    loader's flat dict of tensors would drop), through the one safe pickle reader."""
    try:
        return load_pickle(path)
    except CheckpointError as e:
        raise EmbeddingError(str(e)) from None
    except OSError as e:
        raise EmbeddingError(f"{path}: cannot read embedding file ({e})") from None


def _vectors_of(data: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The file's contents -> ({SINGLE or clip_l/clip_g: tensor}, the token a diffusers file names)."""
    if isinstance(data, torch.Tensor):
        return {SINGLE: data}, None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: string_to_param must hold exactly one tensor")
        return {SINGLE: next(iter(params.values()))}, None
    if all(k in data for k in SDXL_KEYS):
        return {k: data[k] for k in SDXL_KEYS}, None
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # kohya's emb_params, diffusers' {token: vectors}
        (key, value), = tensors.items()
        return {SINGLE: value}, key
    raise EmbeddingError(f"{path}: not a textual-inversion embedding (keys {sorted(map(str, data))[:8]}; expected "
                         "string_to_param, clip_l + clip_g, or a single tensor)")


def read_embedding(path: str | os.PathLike) -> Embedding:
    """An embedding file (see the module docstring) -> Embedding, its vectors (n, D) in float32."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise EmbeddingError(f"{path}: embeddings are read from {', '.join(SUFFIXES)} files "
                             f"(got {path.suffix or 'no suffix'!r})")
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path}")
    try:
        data = load_state_dict(path, check_values=False) if path.suffix == ".safetensors" else _read_pickle(path)
    except CheckpointError as e:
        raise EmbeddingError(str(e)) from None
    vectors, token = _vectors_of(data, path)
    out = {}
    for key, v in vectors.items():
        if not (isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim in (1, 2) and v.numel()):
            raise EmbeddingError(f"{path}: {key!r} is not a (n, D) float tensor")
        out[key] = v.detach().float().reshape(-1, v.shape[-1])  # (n, D); diffusers' single vector is (D,)
    if len({len(v) for v in out.values()}) > 1:
        raise EmbeddingError(f"{path}: clip_l and clip_g hold different numbers of vectors")
    try:
        check_finite(out, path)
    except CheckpointError as e:
        raise EmbeddingError(str(e)) from None
    name = token if path.stem == DIFFUSERS_NAME and token is not None else path.stem
    return Embedding(name, out, path)


def embedding_files(folder: str | os.PathLike) -> list[Path]:
    """Every embedding file under `folder`, subfolders too, as A1111 walks its embeddings folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EmbeddingError(f"embedding folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.suffix in SUFFIXES and p.is_file())


# ============================================================================ the pipeline's encoders


def _encoders(pipe: Any) -> tuple[list[tuple[str, CLIPTextEncoder]], str]:
    """[(the embedding key each CLIP encoder takes, encoder)] and the model's name for messages."""
    model = f"{getattr(pipe, 'name', 'the model')} ({getattr(pipe, 'family', 'unknown family')})"
    enc = getattr(pipe, "text_encoder", None)
    if isinstance(enc, CLIPTextEncoder):
        return [(SINGLE, enc)], model
    if isinstance(enc, SDXLTextEncoder):  # base: clip_l, clip_g; refiner: its one encoder is clip_g
        return list(zip(SDXL_KEYS[-len(enc.encoders):], enc.encoders, strict=True)), model
    raise EmbeddingError(f"{model}: textual-inversion embeddings need CLIP text encoders; this model has "
                         f"{type(enc).__name__ if enc is not None else 'no text encoder'}")


def _check_fits(emb: Embedding, slots: list[tuple[str, CLIPTextEncoder]], model: str) -> None:
    """Refuse (FamilyMismatch) an embedding whose keys or widths are not the encoders', naming both."""
    wanted = " + ".join(f"{k} {e.context_dim}" if k != SINGLE else str(e.context_dim) for k, e in slots)
    if (SINGLE in emb.vectors) != (slots[0][0] == SINGLE):
        kind = "an SDXL embedding (clip_l + clip_g)" if SINGLE not in emb.vectors else "a one-encoder embedding"
        raise FamilyMismatch(f"{emb.path}: {kind} of width {emb.widths()} cannot be used with {model}, whose text "
                             f"encoder width is {wanted}")
    if any(emb.vectors[k].shape[1] != e.context_dim for k, e in slots):
        raise FamilyMismatch(f"{emb.path}: embedding width {emb.widths()} does not match {model}'s text encoder "
                             f"width {wanted} (an embedding for another model: SD 1.x 768, SD 2.x 1024, SDXL "
                             "clip_l 768 + clip_g 1280)")


# ============================================================================ adding and removing


@dataclass
class EmbeddingHandle:
    """Embeddings added to a pipeline: `names` (the trigger words), `skipped` (files refused for
    another model family, by `load_embedding_dir`). `remove()` (or leaving the `with` block) takes
    them out again; the token embeddings return to their rows before, bit for bit."""

    pipe: Any = field(repr=False)
    names: list[str]
    skipped: list[str] = field(default_factory=list)

    def remove(self) -> None:
        if not self.names:
            return
        for _, encoder in _encoders(self.pipe)[0]:
            encoder.remove_words(self.names)
        self.names = []

    def __enter__(self) -> EmbeddingHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def add_embeddings(pipe: Any, embeddings: list[Embedding]) -> EmbeddingHandle:
    """Add read embeddings to `pipe`'s CLIP encoders: all of them, or (EmbeddingError) none."""
    slots, model = _encoders(pipe)
    for emb in embeddings:
        _check_fits(emb, slots, model)
    done: list[CLIPTextEncoder] = []
    names = [emb.name for emb in embeddings]
    try:
        for key, encoder in slots:
            encoder.add_words({emb.name: emb.vectors[key] for emb in embeddings})
            done.append(encoder)
    except ValueError as e:  # a name clash, found by the tokenizer before anything changed
        for encoder in done:
            encoder.remove_words(names)
        where = next((str(emb.path) for emb in embeddings if str(e).startswith(repr(emb.name))), "embedding")
        raise EmbeddingError(f"{where}: {e}") from None
    return EmbeddingHandle(pipe, names)


def load_embeddings(pipe: Any, paths: Iterable[str | os.PathLike]) -> EmbeddingHandle:
    """Read embedding files and add them to `pipe`, each used in prompts by its file stem:

        with load_embeddings(pipe, ["embeddings/ink-style.pt"]):
            pipe.generate("a fox, ink-style")

    Every file is read and checked first; on any error nothing has changed."""
    return add_embeddings(pipe, [read_embedding(p) for p in paths])


def load_embedding_dir(pipe: Any, folder: str | os.PathLike) -> EmbeddingHandle:
    """Every embedding file under `folder` added to `pipe`; those made for another model family are
    skipped with one warning naming each (`handle.skipped`), anything else wrong is an error."""
    slots, model = _encoders(pipe)
    fitting, skipped = [], []
    for path in embedding_files(folder):
        emb = read_embedding(path)
        try:
            _check_fits(emb, slots, model)
        except FamilyMismatch as e:
            skipped.append(str(e))
            continue
        fitting.append(emb)
    if skipped:
        warnings.warn(f"{len(skipped)} embedding(s) in {folder} skipped: " + "; ".join(skipped), stacklevel=2)
    handle = add_embeddings(pipe, fitting)
    handle.skipped = skipped
    return handle
