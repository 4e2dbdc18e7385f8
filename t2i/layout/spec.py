"""A layout: the objects of a picture, each a phrase and a box, as users give it (`--layout FILE.json`,
the API's `layout` field, the web page's canvas) and as the planner writes it.

JSON form: {"units": "pixels" | "fractions", "objects": [{"phrase": "a red circle",
"box": [x0, y0, x1, y1]}, ...]} (a bare list of objects is read as the "objects" list). Pixel boxes
are on the requested width x height; boxes are kept as fractions of the canvas, so one layout
draws the same picture at any size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any


def _finite(v: float) -> bool:
    """A finite number; a JSON integer too large for a float is not one (float() overflows)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


class LayoutError(ValueError):
    """A layout the model cannot draw; the message names the object and the problem."""


@dataclass(frozen=True)
class LayoutObject:
    """phrase: what to draw ("a small red circle"); box: (x0, y0, x1, y1) as fractions of the
    canvas width and height, x1 > x0, y1 > y0."""

    phrase: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Layout:
    """objects: what goes where. background: the background's name when the layout says it (the
    planner does; a user may), else None: the model decides."""

    objects: tuple[LayoutObject, ...]
    background: str | None = None

    @classmethod
    def from_json(cls, data: Any, width: int, height: int) -> Layout:
        """Parse and check the JSON form (already decoded, or a JSON string). Pixel boxes are read
        on a width x height canvas. Raises LayoutError naming the first bad object."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as e:
                raise LayoutError(f"layout is not valid JSON: {e}") from None
        if isinstance(data, list):
            data = {"objects": data}
        if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
            raise LayoutError('a layout is {"objects": [{"phrase": ..., "box": [x0, y0, x1, y1]}, ...]}')
        units = data.get("units", "pixels")
        if units not in ("pixels", "fractions"):
            raise LayoutError(f"layout units must be 'pixels' or 'fractions', got {units!r}")
        objects = []
        for i, obj in enumerate(data["objects"]):
            name = f"layout object {i + 1}"
            if not isinstance(obj, dict):
                raise LayoutError(f"{name}: expected an object with 'phrase' and 'box'")
            phrase = obj.get("phrase")
            if not isinstance(phrase, str) or not phrase.strip():
                raise LayoutError(f"{name}: empty phrase (say what goes in the box)")
            box = obj.get("box")
            if not (isinstance(box, (list, tuple)) and len(box) == 4
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v)
                            for v in box)):
                raise LayoutError(f"{name} ({phrase!r}): box must be four finite numbers [x0, y0, x1, y1]")
            if units == "pixels" and 0 < box[2] - box[0] < 1 and 0 < box[3] - box[1] < 1:
                # Fractions sent without "units": the box would be under a pixel.
                raise LayoutError(f"{name} ({phrase!r}): box {list(box)} is under one pixel; for fractions of "
                                  'the canvas say "units": "fractions"')
            sx, sy = (1.0, 1.0) if units == "fractions" else (float(width), float(height))
            frac = (box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy)
            objects.append(LayoutObject(phrase.strip(), frac))  # type: ignore[arg-type]
        background = data.get("background")
        if background is not None and (not isinstance(background, str) or not background.strip()):
            raise LayoutError(f"layout background must be a name such as 'black', got {background!r}")
        layout = cls(tuple(objects), background.strip() if background else None)
        layout.check()
        return layout

    def check(self, max_objects: int | None = None) -> None:
        """Raise LayoutError for boxes outside the canvas or empty, empty phrases, or more objects
        than `max_objects`."""
        if max_objects is not None and len(self.objects) > max_objects:
            raise LayoutError(f"the layout has {len(self.objects)} objects; this model draws at most {max_objects}")
        for i, o in enumerate(self.objects):
            name = f"layout object {i + 1} ({o.phrase!r})"
            if not o.phrase.strip():
                raise LayoutError(f"layout object {i + 1}: empty phrase")
            x0, y0, x1, y1 = o.box
            if min(x0, y0) < -1e-6 or max(x1, y1) > 1 + 1e-6:
                raise LayoutError(f"{name}: box {list(o.box)} is outside the canvas")
            if x1 <= x0 or y1 <= y0:
                raise LayoutError(f"{name}: box {list(o.box)} is empty (x1 must exceed x0 and y1 exceed y0)")

    def to_json(self) -> str:
        """The canonical one-line JSON in fractions: what the PNG metadata records. Floats are written
        in full (Python's shortest exact form, 0.25 stays 0.25), so `from_json(to_json())` gives the
        same boxes bit for bit and an image regenerated from its metadata is the same image."""
        objs = [{"phrase": o.phrase, "box": [float(v) for v in o.box]} for o in self.objects]
        data: dict[str, Any] = {"units": "fractions", "objects": objs}
        if self.background is not None:
            data["background"] = self.background
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def as_layout(value: Any, width: int, height: int, max_objects: int | None = None) -> Layout | None:
    """What callers accept as a layout (the Python API's, the HTTP APIs' `layout`): None, a Layout,
    or its JSON form (a dict, a bare list of objects, or a JSON string), pixels read on width x
    height (the request's size after the model's defaults). Raises LayoutError naming the object,
    also for more than `max_objects` objects (the model's limit, None: no limit)."""
    if value is None:
        return None
    layout = value if isinstance(value, Layout) else Layout.from_json(value, width, height)
    layout.check(max_objects)
    return layout
