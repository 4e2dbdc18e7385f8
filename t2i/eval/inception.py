"""The FID Inception network: InceptionV3 as TensorFlow's 2015-12-05 graph computes it.

FID (Heusel et al. 2017) and IS (Salimans et al. 2016) are defined with the TensorFlow
Inception graph `inception-2015-12-05`. pytorch-fid, clean-fid and torch-fidelity all use a
PyTorch port of it whose weights ship as `pt_inception-2015-12-05-6726825d.pth` (torch-fidelity:
`weights-inception-2015-12-05-6726825d.pth`, the same tensors). The port differs from
torchvision's InceptionV3 in three places, marked "TF:" below: average pools inside the
A, C and first E blocks exclude the zero padding from the mean, the last E block pools with
max instead of average, and the classifier has 1008 outputs.

Parameter names follow that weights file (torchvision's `Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch1x1.bn.running_mean`, ..., `fc.weight`): the file is the only way these
weights exist, so the module tree mirrors it and no key map is needed.

Nothing is downloaded: `load_fid_inception(path)` reads a file the user has.

Input resizing to 299x299 (what each tool does, all offered by `preprocess`):
- "clean" (default, clean-fid's mode): each channel of the uint8 image is resized as a float
  image with PIL's bicubic filter (antialiased when shrinking), clipped to [0, 255], not
  re-quantized; then (x - 128) / 128.
- "tf1": bilinear resizing as TensorFlow 1.x does it without half-pixel centres (the
  original TF graph, torch-fidelity); then (x - 128) / 128.
- "pytorch": `F.interpolate(bilinear, align_corners=False)` on x / 255, then 2x - 1
  (pytorch-fid's default `resize_input=True, normalize_input=True`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

INPUT_SIZE = 299
RESIZE_MODES = ("clean", "tf1", "pytorch")
WEIGHTS_HINT = (
    "FID/IS/KID need the TF-ported FID Inception weights, which t2i does not download: pass "
    "--inception PATH to `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's GitHub release; "
    "torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` is the same file)."
)


# ---------------------------------------------------------------------------- blocks


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF's) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TF: a 3x3 stride-1 average that divides by the number of real (unpadded) pixels."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pool branches -> 224 + pool_features channels."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: strided 3x3, strided double 3x3, max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorized 7x7 convolutions (1x7 then 7x1) -> 768 channels."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches -> 2048 channels.

    pool: "avg" (TF: padding excluded, Mixed_7b) or "max" (TF: the graph's Mixed_7c pools
    with max where the paper and torchvision average).
    """

    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


# ---------------------------------------------------------------------------- network


@dataclass
class InceptionOutput:
    """pool: (B, 2048) the pool_3 features FID/KID/precision-recall use.
    logits: (B, 1008) fc(pool). logits_unbiased: (B, 1008) pool @ fc.weight.T without the bias,
    the tensor the original IS code (and torch-fidelity) takes the softmax of."""

    pool: torch.Tensor
    logits: torch.Tensor
    logits_unbiased: torch.Tensor


class FIDInceptionV3(nn.Module):
    """InceptionV3 up to pool_3 and the 1008-way classifier, as in the TF FID graph."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> InceptionOutput:
        """x: (B, 3, 299, 299) RGB scaled to [-1, 1] (see `preprocess`)."""
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"expected (B, 3, 299, 299) input, got {tuple(x.shape)}; resize with preprocess()")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048)
        unbiased = pool @ self.fc.weight.T  # (B, 1008)
        return InceptionOutput(pool, unbiased + self.fc.bias, unbiased)


def load_fid_inception(path: str | Path | None, dtype: torch.dtype = torch.float32) -> FIDInceptionV3:
    """The FID Inception from a weights file in the pt_inception-2015-12-05 layout.

    path: a `.pth` state dict (opened with `torch.load(weights_only=True)`) or a
    `.safetensors` file with the same keys. None raises FileNotFoundError saying where the
    weights come from. Returns the network in eval mode, gradients off.
    """
    if path is None:
        raise FileNotFoundError(WEIGHTS_HINT)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file. {WEIGHTS_HINT}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = FIDInceptionV3()
    # BatchNorm counters are bookkeeping, absent from some exports; aux-classifier weights
    # (torchvision exports with aux_logits=True) take no part in the FID graph.
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    own = model.state_dict()
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"{path} is not a FID Inception state dict (pt_inception-2015-12-05 layout): "
                       f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state)
    return model.to(dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------------------- input


def _as_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL image or (H, W, 3) uint8 array -> (H, W, 3) uint8 RGB."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {arr.dtype} {arr.shape}")
    return arr


def resize_clean(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """clean-fid's resize: (H, W, 3) uint8 -> (size, size, 3) float32 in [0, 255].

    Each channel becomes a 32-bit float PIL image ('F' mode) resized with bicubic filtering,
    so nothing is rounded back to 8 bits (the aliasing clean-fid measured in the other modes).
    """
    channels = [
        np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F").resize(
            (size, size), resample=Image.BICUBIC)).clip(0, 255)
        for c in range(3)
    ]
    return np.stack(channels, axis=2).astype(np.float32)


def _tf1_axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of TF 1.x bilinear resizing along one axis (no half-pixel centres)."""
    # float32 positions, as TF computes them (float64 moves values by up to 1e-3 of 255).
    src = torch.arange(n_out, dtype=torch.float32) * torch.tensor(n_in / n_out, dtype=torch.float32)  # (n_out,)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, src - i0


def resize_tf1(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF 1.x `resize_bilinear(align_corners=False)`: (B, C, H, W) -> (B, C, size, size).

    Output pixel i reads source position i * in/out (top-left aligned, unlike PyTorch's
    half-pixel-centred bilinear), interpolating rows then columns.
    """
    h0, h1, wh = _tf1_axis(x.shape[-2], size)
    wh = wh.to(x.dtype)[:, None]
    x = x[..., h0, :] * (1 - wh) + x[..., h1, :] * wh  # (B, C, size, W)
    w0, w1, ww = _tf1_axis(x.shape[-1], size)
    ww = ww.to(x.dtype)
    return x[..., w0] * (1 - ww) + x[..., w1] * ww  # (B, C, size, size)


def preprocess(images: Sequence[Image.Image | np.ndarray], resize: str = "clean") -> torch.Tensor:
    """RGB images (PIL or (H, W, 3) uint8, any size) -> (B, 3, 299, 299) float32 in [-1, 1].

    resize: "clean", "tf1" or "pytorch" (see the module docstring).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    arrays = [_as_uint8(im) for im in images]
    if resize == "clean":
        x = torch.from_numpy(np.stack([resize_clean(a) for a in arrays])).permute(0, 3, 1, 2)
        return (x - 128) / 128
    out = []
    for a in arrays:  # one at a time: the images may differ in size
        x = torch.from_numpy(a).permute(2, 0, 1)[None].float()  # (1, 3, H, W) in [0, 255]
        if resize == "tf1":
            out.append((resize_tf1(x) - 128) / 128)
        else:
            x = F.interpolate(x / 255, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            out.append(2 * x - 1)
    return torch.cat(out)


@torch.no_grad()
def extract_features(
    model: FIDInceptionV3,
    images: Iterable[Image.Image | np.ndarray],
    batch_size: int = 16,
    resize: str = "clean",
) -> tuple[np.ndarray, np.ndarray]:
    """Run the FID Inception over images.

    Returns (pool, logits_unbiased): (N, 2048) and (N, 1008) float64 arrays, the inputs of
    FID/KID/precision-recall and of IS respectively.
    """
    dtype = next(model.parameters()).dtype
    pools, logits, batch = [], [], []

    def flush() -> None:
        out = model(preprocess(batch, resize).to(dtype))
        pools.append(out.pool.double().numpy())
        logits.append(out.logits_unbiased.double().numpy())
        batch.clear()

    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not pools:
        raise ValueError("no images")
    return np.concatenate(pools), np.concatenate(logits)
