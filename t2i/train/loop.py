"""The pieces `t2i.train.fit` is made of: stop signals, the non-finite-loss guard, the learning-rate
warm-up, which samples a step reads, the run's log (text, TensorBoard, captioned PNG grids) and its exit code."""

from __future__ import annotations

import math
import signal
import sys
import textwrap
import time
from pathlib import Path
from types import FrameType

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from t2i.train.distributed import DistInfo, cleanup

# Narrowest cell of a captioned grid, in pixels: about 25 characters of PIL's default font a line.
CAPTION_CELL = 128


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the run stops before the bad step touches the weights."""


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step, so it can save a
    checkpoint at a step boundary and exit instead of dying half-way through an update."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # a second signal: the user really wants out now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nreceived signal {signum}: saving a checkpoint and stopping after this step",
              file=sys.stderr)

    def __enter__(self) -> StopSignal:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)  # type: ignore[arg-type]


def check_finite_loss(loss: torch.Tensor, step: int, name: str = "loss") -> None:
    """Raise NonFiniteLossError naming the step if `loss` is NaN or Inf."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(f"{name} is {loss.item()} at step {step}; stopping the run "
                                 "(the last checkpoint written is from before this step)")


def warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from base_lr / warmup_steps to base_lr, then constant (LDM's schedule)."""
    return base_lr * min(1.0, (step + 1) / max(1, warmup_steps))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate on every parameter group, times the group's "lr_scale" when it has one
    (new layers beside warm-started ones learn faster)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator for one step's randomness (noise, timesteps, caption dropout, posterior
    samples). A pure function of (seed, step, rank): a resumed run draws exactly the same
    numbers without carrying generator state, on any number of ranks."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank)


def batch_indices(position: int, batch_size: int, info: DistInfo, length: int | None = None,
                  seed: int = 0) -> list[int]:
    """Dataset indices of this rank's share of the global batch starting at `position`
    (the number of samples the run has consumed so far, over all ranks).

    Ranks read disjoint, contiguous slices. For an endless stream (`length` None) the index
    is the position itself; for a finite dataset it walks a fresh permutation each epoch,
    seeded by (seed, epoch), so the order is a function of the position alone.
    """
    start = position + info.rank * batch_size
    positions = range(start, start + batch_size)
    if length is None:
        return list(positions)
    out, perms = [], {}
    for p in positions:
        epoch = p // length
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(length)
        out.append(int(perms[epoch][p % length]))
    return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, captions: list[str] | None = None) -> None:
    """Tile (N, 3, H, W) images in [-1, 1] into one PNG, `nrow` per row, 2 px gray gutters.

    With `captions` (one per image) each caption is written under its image in PIL's default font,
    wrapped to the cell; cells narrower than CAPTION_CELL px are first enlarged (nearest neighbour,
    an integer factor) so a caption has room and the pixels stay visible.
    """
    arr = to_uint8(images)  # (N, H, W, 3)
    n, h, w, _ = arr.shape
    lines: list[list[str]] = []
    text_h = 0
    if captions is not None:
        if len(captions) != n:
            raise ValueError(f"{len(captions)} captions for {n} images")
        scale = max(1, math.ceil(CAPTION_CELL / w))
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
        font = ImageFont.load_default()
        per_line = max(1, int((w - 4) // font.getlength("x")))
        lines = [textwrap.wrap(c, per_line) or [""] for c in captions]
        line_h = font.getbbox("Ag")[3] + 2
        text_h = line_h * max(len(ls) for ls in lines) + 4
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    cell_h = h + text_h
    grid = np.full((rows * (cell_h + 2) + 2, cols * (w + 2) + 2, 3), 128, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = 2 + r * (cell_h + 2), 2 + c * (w + 2)
        grid[top: top + h, left: left + w] = arr[i]
        grid[top + h: top + cell_h, left: left + w] = 255  # the caption's white strip
    image = Image.fromarray(grid)
    if lines:
        draw = ImageDraw.Draw(image)
        for i, caption_lines in enumerate(lines):
            r, c = divmod(i, cols)
            draw.multiline_text((2 + c * (w + 2) + 2, 2 + r * (cell_h + 2) + h + 2), "\n".join(caption_lines),
                                fill=(0, 0, 0), font=font, spacing=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


class RunLog:
    """Scalars to TensorBoard (if installed) and to `log.txt`, a tqdm bar with it/s and ETA.
    On ranks other than 0 everything is silent (and everywhere with `quiet`)."""

    def __init__(self, run_dir: Path, info: DistInfo, start_step: int, total_steps: int, quiet: bool = False) -> None:
        self.enabled = info.is_main and not quiet
        self.run_dir = run_dir
        self.tb = None
        self.bar = None
        self.t0 = time.time()
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "log.txt", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:
            self.text("tensorboard is not installed: scalars go to log.txt only (pip install tensorboard)")
        from tqdm import tqdm
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        file=sys.stderr, smoothing=0.1)

    def text(self, msg: str) -> None:
        if self.enabled:
            line = f"[{time.strftime('%H:%M:%S')}] {msg}"
            self.file.write(line + "\n")
            (self.bar.write if self.bar is not None else print)(line, file=sys.stderr)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        self.file.write(f"step {step} " + " ".join(f"{k}={v:.5g}" for k, v in values.items()) + "\n")

    def resumed_at(self, step: int) -> None:
        """Move the bar to `step`: for a log opened before the checkpoint was read."""
        if self.bar is not None:
            self.bar.n = self.bar.last_print_n = step

    def advance(self, postfix: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            if self.tb is not None:
                self.tb.close()
            self.file.close()


def finish_run(log: RunLog, stop: StopSignal, step: int, info: DistInfo) -> int:
    """Close the run's log and leave the process group. Returns the exit code: 0, or 128 + the signal
    number after a stop by SIGINT/SIGTERM (as a shell reports a job killed by that signal)."""
    log.text(f"done at step {step}")
    log.close()
    cleanup(info)
    return 0 if stop.signum is None else 128 + stop.signum
