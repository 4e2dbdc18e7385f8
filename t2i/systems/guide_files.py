"""The guidance file a pixel pipeline reads beside its own weights: ADM's noise-aware classifier for DDPM
(Dhariwal & Nichol 2021, sec. 4), GLIDE's noise-aware CLIP (Nichol et al. 2021, sec. 2.4). A request names it
where ADM's classifier goes (`classifier`, `classifier_scale`, `t2i generate --classifier FILE
--classifier-scale S`), or the pipeline sets a default for every request (`with_classifier`,
`with_clip_guidance`); either way the file is loaded once, checked against the model's noise schedule (a guide
trained on other noise levels reads x_t wrongly), and kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Generic, TypeVar

import torch

from t2i.diffusion.schedules import ScheduleConfig
from t2i.systems.base import GenerationRequest, UnsupportedOption

T = TypeVar("T")


def with_default_guide(r: GenerationRequest, default: tuple[str | Path, float] | None) -> GenerationRequest:
    """The request with a pipeline's default guidance file and scale (`with_classifier`, GLIDE's
    `with_clip_guidance`) when it names no file itself (its own classifier_scale, if any, replaces the default
    one); UnsupportedOption naming classifier_scale when it gives a scale and there is no file to guide with."""
    if r.classifier is None and default is not None:
        r = replace(r, classifier=default[0], classifier_scale=default[1] if r.classifier_scale is None
                    else r.classifier_scale)
    if r.classifier is None and r.classifier_scale is not None:
        raise UnsupportedOption("classifier_scale", "classifier_scale needs classifier (the file to guide with)")
    return r


class GuideFiles(Generic[T]):
    """A pipeline's guidance files: the one loaded last (by path) and the default (file, scale).

    Args:
        load: path -> (the guide, the noise schedule it was trained on); raises ValueError for a file that is not
            one (CheckpointError is one).
        schedule: the model's schedule, read at each load (the pipeline's attribute may be replaced).
        what: the guide's name in messages ("classifier", "CLIP").
    """

    def __init__(self, load: Callable[[str | Path], tuple[T, ScheduleConfig]], schedule: Callable[[], ScheduleConfig],
                 what: str) -> None:
        self.load, self.schedule, self.what = load, schedule, what
        self.default: tuple[str | Path, float] | None = None
        self._kept: dict[str, T] = {}

    def get(self, path: str | Path) -> T:
        """The guide in the file at `path`, checked against the model's schedule; loaded once per path (a request
        may name it at every call; one kept: a later file replaces it). Safe from two threads (the server checks
        requests while a batch runs): each reads the entry it found or made."""
        key = str(Path(path).resolve())
        guide = self._kept.get(key)
        if guide is None:
            guide, schedule = self.load(path)
            ours = self.schedule()
            if not torch.allclose(schedule.alphas_cumprod(), ours.alphas_cumprod()):
                raise ValueError(f"{path}: the {self.what} was trained on another noise schedule "
                                 f"({schedule.beta_schedule}) than this model's ({ours.beta_schedule})")
            self._kept = {key: guide}
        return guide

    def set_default(self, path: str | Path, scale: float) -> None:
        """Guide every later request without its own file with `path` at `scale` (loaded and checked now, not at
        the first request); scale 0 turns it off."""
        if scale != 0:
            self.get(path)
        self.default = None if scale == 0 else (path, float(scale))

    def resolve(self, r: GenerationRequest) -> GenerationRequest:
        """`with_default_guide` with this pipeline's default."""
        return with_default_guide(r, self.default)

    def requested(self, r: GenerationRequest) -> tuple[T, float] | None:
        """(guide, scale) of a resolved request (an unset scale is 1), None when it is not guided (no file, or
        scale 0)."""
        if r.classifier is None or r.classifier_scale == 0:
            return None
        return self.get(r.classifier), 1.0 if r.classifier_scale is None else float(r.classifier_scale)
