"""The FID Inception against torch-fidelity's port of the same TF graph, on the same random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fid_oracles import oracles

from t2i.eval import inception
from t2i.eval.inception import FIDInceptionV3, load_fid_inception, preprocess, resize_clean, resize_tf1


def _random_inception(seed: int = 0) -> FIDInceptionV3:
    """Random weights that keep activations O(1) through 90 conv layers (He-scaled convs,
    BatchNorm statistics and affine parameters drawn near their identity values)."""
    g = torch.Generator().manual_seed(seed)
    model = FIDInceptionV3()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.endswith("conv.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
            elif name.endswith(("bn.weight", "bn.running_var")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith(("bn.bias", "bn.running_mean")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.startswith("fc."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(_random_inception().state_dict(), path)
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_pool_features_and_logits_match_torch_fidelity(weights_file: str) -> None:
    o = oracles()
    oracle = o.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                           feature_extractor_weights_path=weights_file)
    ours = load_fid_inception(weights_file)
    assert set(ours.state_dict()) == set(oracle.state_dict())  # the pt_inception-2015-12-05 key layout
    images = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        ref_pool, ref_unbiased, ref_logits = oracle(images)
        out = ours(preprocess(list(images.permute(0, 2, 3, 1).numpy()), resize="tf1"))
    scale = ref_pool.abs().max().item()
    err = (out.pool - ref_pool).abs().max().item() / scale
    print(f"pool feature scale {scale:.4g} (std {ref_pool.std():.3g}), max rel error {err:.2e}")
    assert 0.05 < ref_pool.std() < 100  # activations neither vanished nor exploded
    assert err < 1e-5
    torch.testing.assert_close(out.logits_unbiased, ref_unbiased, rtol=1e-5, atol=1e-5 * ref_unbiased.abs().max())
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5 * ref_logits.abs().max())
    # The two images differ, so a network ignoring its input could not pass.
    assert (ref_pool[0] - ref_pool[1]).abs().max() > 1e-3 * scale


def test_tf1_resize_matches_torch_fidelity() -> None:
    o = oracles()
    x = torch.randint(0, 256, (2, 3, 37, 64), generator=torch.Generator().manual_seed(2)).float()
    ref = o.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    ours = resize_tf1(x)
    print(f"tf1 resize max abs diff {(ours - ref).abs().max():.2e}")
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)  # of 255: float32 rounding
    same = torch.randint(0, 256, (1, 3, 299, 299), generator=torch.Generator().manual_seed(3)).float()
    assert torch.equal(resize_tf1(same), same)


def test_clean_resize_matches_clean_fid() -> None:
    pytest.importorskip("cleanfid", reason="pip install --no-deps clean-fid")
    from cleanfid.resize import make_resizer

    image = np.random.RandomState(4).randint(0, 256, (48, 80, 3)).astype(np.uint8)
    ref = make_resizer("PIL", False, "bicubic", (299, 299))(image)
    np.testing.assert_array_equal(resize_clean(image), ref)
    x = preprocess([image], resize="clean")  # (1, 3, 299, 299), clean-fid's (x - 128) / 128
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), (ref - 128) / 128, rtol=0, atol=1e-6)


def test_pytorch_resize_is_pytorch_fid_input() -> None:
    image = np.random.RandomState(5).randint(0, 256, (32, 32, 3)).astype(np.uint8)
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    ref = 2 * torch.nn.functional.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(preprocess([image], resize="pytorch"), ref, rtol=0, atol=0)


def test_missing_weights_message(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="--inception PATH.*pt_inception-2015-12-05"):
        load_fid_inception(None)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_fid_inception(tmp_path / "nope.pth")
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "wrong.pth")
    with pytest.raises(KeyError, match="not a FID Inception state dict"):
        load_fid_inception(tmp_path / "wrong.pth")


def test_file_without_batchnorm_counters_loads(tmp_path, weights_file: str) -> None:
    state = torch.load(weights_file, weights_only=True)
    slim = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(slim, tmp_path / "slim.pth")
    model = load_fid_inception(tmp_path / "slim.pth")
    torch.testing.assert_close(model.fc.weight, state["fc.weight"], rtol=0, atol=0)
    assert not model.training and not model.fc.weight.requires_grad
    assert inception.RESIZE_MODES == ("clean", "tf1", "pytorch")
