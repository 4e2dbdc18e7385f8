"""Training checkpoints: one safetensors file per save, written atomically, resumed exactly.

A checkpoint holds everything a run needs to continue bit for bit: the model(s), the EMA
copy, every optimizer's state, the global RNG states (torch, numpy, python), the step and
the data position. Tensors go into the safetensors body; the few non-tensor values
(optimizer hyper-parameters, python's RNG tuple, the run config) go into its JSON metadata.
Nothing is pickled, so nothing in a checkpoint can run code when it is loaded.

Atomicity comes from `t2i.checkpoints.io.save_state_dict` (write to a temporary name,
fsync, rename): a run killed while saving leaves the previous checkpoint untouched and at
worst a hidden `.tmp-*` file that `latest_checkpoint` never looks at.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from safetensors import safe_open

from t2i.checkpoints.io import check_finite, load_state_dict, save_state_dict

_NAME = re.compile(r"^step_(\d{8})\.safetensors$")


class RunConfig(Protocol):
    """What the helpers at the end of this file need of a training loop's config dataclass."""

    out: str
    steps: int
    keep: int

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any: ...


C = TypeVar("C", bound=RunConfig)


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.safetensors"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None. Temporary files are never considered."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    return found[-1][1] if found else None


def _optimizer_to_flat(prefix: str, opt: torch.optim.Optimizer,
                       tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Tensor entries of an optimizer's state go to `tensors`; the rest is returned for JSON."""
    sd = opt.state_dict()
    rest: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        rest["state"][str(idx)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{idx}.{k}"] = v.detach().clone()
            else:
                rest["state"][str(idx)][k] = v
    return rest


def _optimizer_from_flat(prefix: str, opt: torch.optim.Optimizer, rest: dict[str, Any],
                         tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in rest["state"].items()}
    for name, t in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global RNG states: torch's as a tensor, numpy's and python's as JSON-able values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return ({"rng.torch": torch.get_rng_state()},
            {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "python": [py_state[0], list(py_state[1]), py_state[2]]})


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(path: str | Path, *, step: int, data_position: int, config: dict[str, Any],
                    modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Write one checkpoint atomically. Refuses (CheckpointError) if any weight is NaN/Inf.

    modules: e.g. {"model": unet, "ema": ema_unet, "disc": discriminator}; each state dict is
    stored under its name as a prefix. optimizers: likewise, e.g. {"opt": adamw}.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().clone()  # clone: tied or shared storage is not allowed
    check_finite(tensors, path)
    meta: dict[str, Any] = {"step": step, "data_position": data_position, "config": config, "optimizers": {}}
    for name, opt in optimizers.items():
        meta["optimizers"][name] = _optimizer_to_flat(f"optim.{name}", opt, tensors)
    rng_tensors, meta["rng"] = rng_state()
    tensors.update(rng_tensors)
    save_state_dict(tensors, path, metadata={"t2i_train": json.dumps(meta)})


def load_checkpoint(path: str | Path, *, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], restore_rng: bool = True) -> dict[str, Any]:
    """Restore modules, optimizers and RNG states in place; returns the metadata
    (step, data_position, config)."""
    tensors = load_state_dict(path)
    meta = read_metadata(path)
    for name, mod in modules.items():
        pre = name + "."
        mod.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    for name, opt in optimizers.items():
        _optimizer_from_flat(f"optim.{name}", opt, meta["optimizers"][name], tensors)
    if restore_rng:
        set_rng_state(tensors, meta["rng"])
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("t2i_train")
    if raw is None:
        raise ValueError(f"{path}: not a t2i training checkpoint (no 't2i_train' metadata)")
    return json.loads(raw)


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (the newest is always kept)."""
    folder = Path(run_dir) / "checkpoints"
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    for _, p in found[:-max(keep, 1)]:
        p.unlink(missing_ok=True)


# ---------------------------------------------------------------- what every training loop does with these


def resume_run(cfg: C, resume: bool, lr: float | None = None) -> tuple[C, Path | None]:
    """The config to run with and the checkpoint to continue from (None: a fresh run).

    With `resume`: the newest checkpoint under `cfg.out` (FileNotFoundError if there is none, rather
    than silently starting over) and the run's own saved config, which wins (a resumed run must train
    the same model on the same data) except for how long it runs (the longer `steps`) and, when `lr` is
    given, its learning rate from here on (lowering it late in a long constant-rate run is the point).
    """
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"--resume-lr must be a positive learning rate, got {lr}")
    if not resume:
        if lr is not None:
            raise ValueError("--resume-lr only applies with --resume (a new run takes --lr)")
        return cfg, None
    ckpt = latest_checkpoint(cfg.out)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {Path(cfg.out) / 'checkpoints'}")
    saved = type(cfg).from_dict(read_metadata(ckpt)["config"])
    saved.steps = max(saved.steps, cfg.steps)
    if lr is not None:
        saved.lr = lr
    return saved, ckpt


def restore(ckpt: Path | None, modules: dict[str, torch.nn.Module],
            optimizers: dict[str, torch.optim.Optimizer]) -> tuple[int, int]:
    """Load `ckpt` into the modules and optimizers and return its (step, data position); (0, 0) for a
    fresh run. It also restores the global RNG states, so call it after the models are built (their
    random init is overwritten anyway) and before anything else draws."""
    if ckpt is None:
        return 0, 0
    meta = load_checkpoint(ckpt, modules=modules, optimizers=optimizers)
    return meta["step"], meta["data_position"]


def save_and_prune(run_dir: str | Path, cfg: RunConfig, *, step: int, data_position: int,
                   modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Write the run's checkpoint for `step` (with its config), then keep only the newest `cfg.keep`."""
    save_checkpoint(checkpoint_path(run_dir, step), step=step, data_position=data_position, config=cfg.to_dict(),
                    modules=modules, optimizers=optimizers)
    prune_checkpoints(run_dir, cfg.keep)
