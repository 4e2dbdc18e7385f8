"""The shapes world, v1 (docs/SHAPES_WORLD.md describes it): scenes of 1-4 flat coloured
shapes on a uniform background, rendered anti-aliased at any size, with the full ground truth and
several true captions each.

One module per concept, read in this order:
- `world`: the contract (palette, sizes, layout rules), the scene model, geometric truths.
- `sampling`: drawing a scene aimed at a caption family.
- `rendering`: pixels and ground-truth masks at any size.
- `captioning`: the true captions of a scene.
- `prompts`: the parser that reads a caption back into claims (the judge checks those).
- `heldout`: the judge's held-out prompts, which training never shows.
- `datasets`: scene i of seed s with its caption; datasets and the on-disk writer.

The names below are the world's public API, importable from `t2i.data.shapes`.
"""

from t2i.data.shapes.captioning import captions
from t2i.data.shapes.rendering import object_masks, render, render_array, shape_coverage
from t2i.data.shapes.sampling import BACKGROUND_P, FAMILY_WEIGHTS, sample_scene
from t2i.data.shapes.world import (
    BACKGROUND_RGB,
    CANVAS,
    CAPTION_SAFETY,
    FAMILIES,
    MIN_GAP,
    NEW_SHAPES,
    PALETTE,
    REGION_HI,
    REGION_LO,
    RELATION_MARGIN,
    RING_HOLE,
    SHAPES,
    SIZE_RANGES,
    Scene,
    ShapeObject,
    gap,
    region_holds,
    regions_of,
    relation_holds,
)

__all__ = [
    "BACKGROUND_P", "BACKGROUND_RGB", "CANVAS", "CAPTION_SAFETY", "FAMILIES", "FAMILY_WEIGHTS", "MIN_GAP",
    "NEW_SHAPES", "PALETTE", "PRIMARY_P", "REGION_HI", "REGION_LO", "RELATION_MARGIN", "RING_HOLE", "SHAPES",
    "SIZE_RANGES", "Scene",
    "ShapeObject", "ShapesDataset", "ShapesStream", "captions", "default_exclude", "gap", "object_masks",
    "region_holds", "regions_of", "relation_holds", "render", "render_array", "sample_scene", "shape_coverage",
    "shapes_example", "to_tensor", "write_shapes_dataset",
]


# The datasets (and through them the judge's held-out prompts and the caption parser) load on first
# use, so that generating with a shapes model never imports the parser (issue 17: nothing at
# generation time reads the caption grammar; tests/test_shapes_layout.py checks it).
_DATASET_NAMES = frozenset({"PRIMARY_P", "ShapesDataset", "ShapesStream", "default_exclude", "shapes_example",
                            "to_tensor", "write_shapes_dataset"})


def __getattr__(name: str):
    if name in _DATASET_NAMES:
        from t2i.data.shapes import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 't2i.data.shapes' has no attribute {name!r}")
