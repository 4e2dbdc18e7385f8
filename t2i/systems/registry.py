"""The registry of model families (systems) and the models t2i ships.

A family's module defines `SYSTEM = System(...)` (t2i.systems.base): its name, how to recognise its checkpoint
layouts on disk, how to load one, how to write a tiny random one (for the tests that every
family gets by registering), and the models it ships. Adding a family is adding its module
to FAMILY_MODULES. `resolve(name_or_path)` finds the family that recognises a path, or the shipped
model of that name (`t2i.load` then loads it with that family, in the precision asked).

The registry imports the family modules by name from this list (as `t2i.cli` does with its
subcommands); the family modules import `t2i.systems.base`, never this module, so there is no cycle.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from t2i.systems.base import ShippedModel, System

# One line per family. Each `detect` accepts only its own layouts (a diffusers folder by its pipeline class),
# so the order only decides which family is asked first.
FAMILY_MODULES: tuple[str, ...] = (
    "t2i.systems.shapes_ldm",
    "t2i.systems.shapes_layout",
    "t2i.systems.ddpm",
    "t2i.systems.stable_diffusion",
    "t2i.systems.dit",
    "t2i.systems.pixart",
    "t2i.systems.maskgit",
    "t2i.systems.muse",
    "t2i.systems.dalle",
    "t2i.systems.parti",
    "t2i.systems.vqgan_clip",
    "t2i.systems.amused",
    "t2i.systems.sd_upscale",
    "t2i.systems.deepfloyd_if",
    "t2i.systems.unclip",
    "t2i.systems.glide",
    "t2i.systems.ediffi",
)


def systems() -> list[System]:
    """Every registered family, in detection order."""
    return [importlib.import_module(m).SYSTEM for m in FAMILY_MODULES]


def system(name: str) -> System:
    """The family called `name`."""
    for s in systems():
        if s.name == name:
            return s
    raise ValueError(f"unknown model family {name!r}; t2i has {', '.join(s.name for s in systems())}")


def shipped_models() -> list[tuple[System, ShippedModel]]:
    """Every shipped model with its family (including ones whose files are missing)."""
    return [(s, m) for s in systems() for m in s.shipped]


def default_model() -> tuple[System, ShippedModel]:
    """The shipped model `t2i generate` uses when no --model is given."""
    for s, m in shipped_models():
        if m.default:
            return s, m
    raise FileNotFoundError("no default model is registered")


def model_dir() -> Path:
    """Where installed models live: $T2I_MODEL_DIR, else ~/.local/share/t2i/models. Each file or
    folder in it that a family recognises is a model named after it (stem for files)."""
    return Path(os.environ.get("T2I_MODEL_DIR") or Path.home() / ".local" / "share" / "t2i" / "models")


@dataclass(frozen=True)
class ModelEntry:
    """One row of `t2i models`: a shipped model or one installed in `model_dir()`."""

    name: str
    family: str
    path: Path
    source: str  # "shipped" or "installed"
    default: bool = False
    description: str = ""
    score: str = ""  # the "Score:" line of its model card


def _card_score(card: Path | None) -> str:
    if card is None or not card.is_file():
        return ""
    for line in card.read_text(encoding="utf-8").splitlines():
        if line.lower().startswith("score:"):
            return line.split(":", 1)[1].strip()
    return ""


def installed_models() -> list[tuple[System, str, Path]]:
    """(family, name, path) of every entry of `model_dir()` a family recognises."""
    folder = model_dir()
    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        s = next((s for s in systems() if s.detect(path)), None)
        if s is not None:
            found.append((s, path.stem if path.is_file() else path.name, path))
    return found


def model_entries() -> list[ModelEntry]:
    """The shipped models, then the installed ones."""
    rows = [ModelEntry(m.name, s.name, m.path, "shipped", m.default, m.description, _card_score(m.card))
            for s, m in shipped_models()]
    for s, name, path in installed_models():
        card = path / "MODEL_CARD.md" if path.is_dir() else path.with_suffix(".md")
        rows.append(ModelEntry(name, s.name, path, "installed", score=_card_score(card)))
    return rows


def resolve(model: str | Path | None) -> tuple[System, Path]:
    """A model name or path -> (its family, its path). None is the default model; a name that is
    not a path is looked up among the shipped models, then the installed ones."""
    if model is None:
        s, m = default_model()
        return s, _present(m)
    path = Path(model)
    if not path.exists():
        for s, m in shipped_models():
            if m.name == str(model):
                return s, _present(m)
        for s, name, found in installed_models():
            if name == str(model):
                return s, found
        names = ", ".join(e.name for e in model_entries())
        raise FileNotFoundError(f"model not found: {model} (not a file or folder, nor a model named in "
                                f"`t2i models`: {names})")
    for s in systems():
        if s.detect(path):
            return s, path
    kinds = "; ".join(f"{s.name}: {s.description}" for s in systems())
    raise ValueError(f"{path}: not a model any family recognises ({kinds})")


def _present(m: ShippedModel) -> Path:
    if not m.path.exists():
        raise FileNotFoundError(f"the shipped model {m.name!r} is missing ({m.path}); reinstall t2i or "
                                "give --model PATH")
    return m.path
