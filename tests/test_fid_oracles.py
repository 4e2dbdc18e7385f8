"""Test-only oracles for the FID code: torch-fidelity and pytorch-fid, imported without torchvision.

Both packages import torchvision at module level, and torchvision's wheels do not match our
torch build. The pieces used as oracles (torch-fidelity's `FeatureExtractorInceptionV3`, its
TF1 bilinear resize, IS/KID/precision-recall functions; pytorch-fid's
`calculate_frechet_distance`) never call torchvision, so a placeholder module is installed
under that name before importing them. Install the oracles with
`pip install --no-deps torch-fidelity pytorch-fid clean-fid`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest

_STUBS = (
    "torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional",
    "torchvision.models", "torchvision.models.utils", "torchvision.models.inception",
)


class _Placeholder(types.ModuleType):
    """A module whose every attribute is an inert class (subclassable, never called here)."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, cls)
        return cls


def _install_torchvision_placeholder() -> list[str]:
    """Placeholders for the torchvision modules; returns the names installed."""
    if "torchvision" in sys.modules:
        return []
    try:
        importlib.import_module("torchvision")
        return []  # a working torchvision: nothing to do
    except Exception:
        pass
    for name in _STUBS:
        module = _Placeholder(name)
        module.__path__ = []
        module.__version__ = "0.0"
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    return list(_STUBS)


def oracles() -> types.SimpleNamespace:
    """The oracle functions and classes, or a pytest skip naming the missing packages."""
    missing = [name for name in ("torch_fidelity", "pytorch_fid") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"oracles not installed: {missing}; pip install --no-deps torch-fidelity pytorch-fid")
    installed = _install_torchvision_placeholder()
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
        from torch_fidelity.metric_fid import fid_statistics_to_metric
        from torch_fidelity.metric_isc import isc_features_to_metric
        from torch_fidelity.metric_kid import kid_features_to_metric
        from torch_fidelity.metric_prc import calculate_precision_recall_full
    finally:
        # The oracles hold their references; take the placeholders away again so that other
        # code probing for torchvision (transformers, diffusers) finds none, as before.
        for name in installed:
            sys.modules.pop(name, None)

    return types.SimpleNamespace(**{f.__name__: f for f in (
        calculate_frechet_distance, FeatureExtractorInceptionV3, interpolate_bilinear_2d_like_tensorflow1x,
        fid_statistics_to_metric, isc_features_to_metric, kid_features_to_metric,
        calculate_precision_recall_full)})


def test_oracles_import() -> None:
    o = oracles()
    assert callable(o.calculate_frechet_distance) and callable(o.kid_features_to_metric)
