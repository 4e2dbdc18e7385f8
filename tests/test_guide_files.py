"""systems.guide_files: the guidance file a DDPM (ADM classifier) or GLIDE (noise-aware CLIP) pipeline keeps."""

from __future__ import annotations

import pytest

from t2i.systems.base import GenerationRequest, UnsupportedOption
from t2i.systems.ddpm import ddpm_schedule
from t2i.systems.guide_files import GuideFiles


def _files(tmp_path, schedule=None) -> tuple[GuideFiles, list[str]]:
    loads: list[str] = []

    def load(path):
        loads.append(str(path))
        return f"guide of {path}", schedule or ddpm_schedule()

    return GuideFiles(load, ddpm_schedule, "classifier"), loads


def test_a_file_is_loaded_once_until_another_replaces_it(tmp_path):
    files, loads = _files(tmp_path)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert files.get(a) == f"guide of {a}" and files.get(tmp_path / "." / "a.safetensors") == f"guide of {a}"
    assert loads == [str(a)]  # the same file by another spelling of its path: not read again
    files.get(b)
    files.get(a)
    assert loads == [str(a), str(b), str(a)]  # one kept


def test_a_guide_of_another_schedule_is_refused_by_name(tmp_path):
    files, _ = _files(tmp_path, ddpm_schedule("squaredcos_cap_v2"))
    with pytest.raises(ValueError, match=r"the classifier was trained on another noise schedule \(squaredcos_cap_v2\) "
                                         r"than this model's \(linear\)"):
        files.get(tmp_path / "c.safetensors")


def test_the_default_fills_requests_without_their_own_file_and_a_scale_alone_is_refused(tmp_path):
    files, loads = _files(tmp_path)
    plain = GenerationRequest("a red circle")
    assert files.requested(files.resolve(plain)) is None
    with pytest.raises(UnsupportedOption, match="classifier_scale needs classifier"):
        files.resolve(GenerationRequest("a red circle", classifier_scale=2.0))
    files.set_default(tmp_path / "d.safetensors", 4.0)
    assert loads == [str(tmp_path / "d.safetensors")]  # checked when set, not at the first request
    assert files.requested(files.resolve(plain)) == (f"guide of {tmp_path / 'd.safetensors'}", 4.0)
    own_scale = files.resolve(GenerationRequest("a red circle", classifier_scale=2.0))
    assert files.requested(own_scale)[1] == 2.0
    own_file = files.resolve(GenerationRequest("a red circle", classifier=tmp_path / "e.safetensors"))
    assert files.requested(own_file) == (f"guide of {tmp_path / 'e.safetensors'}", 1.0)  # its scale unset: 1
    assert files.requested(files.resolve(GenerationRequest("a red circle", classifier_scale=0.0))) is None
    files.set_default(tmp_path / "d.safetensors", 0)
    assert files.default is None
