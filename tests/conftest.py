"""Shared test fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# tests/ holds shared oracle builders (sd_oracles.py); make them importable from any test.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast on an idle machine and avoids the 10-100x
    slow-down of spinning worker threads on a shared, loaded one. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    """(a tiny random SD1 diffusers folder, a tiny captioned image folder) for the training tests."""
    from captioned_folder import write_captioned_folder
    from sd_oracles import build_sd1

    root = tmp_path_factory.mktemp("sd1")
    build_sd1(root / "model")
    return root / "model", write_captioned_folder(root / "data")
