"""Training checkpoints: one safetensors file per save, written atomically, resumed exactly.

A checkpoint holds everything a run needs to continue bit for bit: the model(s), the EMA
copy, every optimizer's state, the global RNG states (torch, numpy, python), the step and
the data position. Tensors go into the safetensors body; the few non-tensor values
(optimizer hyper-parameters, python's RNG tuple, the run config) go into its JSON metadata.
Nothing is pickled, so nothing in a checkpoint can run code when it is loaded.

Atomicity comes from `t2i.checkpoints.io.save_state_dict` (write to a temporary name,
fsync, rename): a run killed while saving leaves the previous checkpoint untouched and at
worst a hidden `.tmp-*` file that `latest_checkpoint` never looks at. A file damaged later
(a full disk, a bad copy) is caught by the SHA-256 of its tensors written into its metadata:
`--resume` then falls back to the newest intact checkpoint and names the bad one.

Runs sharded with FSDP save directories instead (`step_N.dcp`, written by `t2i.train.fsdp`): the
same names, listing, pruning and fallback apply, checked by the SHA-256 of every file in them.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from t2i.checkpoints.io import CheckpointError, check_finite, load_state_dict, save_state_dict

_NAME = re.compile(r"^step_(\d{8})\.(safetensors|dcp)$")
SHARDED_META = "t2i_train.json"  # a sharded checkpoint's metadata, written last


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.safetensors"


def sharded_checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.dcp"


def checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's checkpoints (files, or directories of a sharded run), oldest first. Temporary files
    are never considered."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    return [p for _, p in found]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run, or None (not verified: see `latest_intact_checkpoint`)."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_sharded(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint's metadata once every file listed in it matches its SHA-256, or
    CheckpointError naming what does not."""
    path = Path(path)
    try:
        meta = json.loads((path / SHARDED_META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no readable {SHARDED_META} ({e})") from None
    for name, digest in meta["sha256"].items():
        if not (path / name).is_file() or file_sha256(path / name) != digest:
            raise CheckpointError(f"{path}: {name} is missing or does not match the SHA-256 saved with it")
    return meta


def verify_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint whole and check it: (tensors, metadata), or CheckpointError naming the file
    (empty, truncated, not a training checkpoint, or tensors that no longer match the SHA-256 saved
    with them). Checkpoints written before the checksum existed are accepted if they read. A sharded
    checkpoint (a directory) is checked file by file and returns no tensors."""
    if Path(path).is_dir():
        return {}, verify_sharded(path)
    tensors = load_state_dict(path)
    try:
        meta = read_metadata(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(str(e)) from None
    if "sha256" in meta and tensors_sha256(tensors) != meta["sha256"]:
        raise CheckpointError(f"{path}: its tensors do not match the SHA-256 saved with them (corrupt file)")
    return tensors, meta


def latest_intact_checkpoint(run_dir: str | Path, warn: Callable[[str], None],
                             move_aside: bool = True) -> Path | None:
    """The newest checkpoint that passes `verify_checkpoint`. Each newer one that does not is named
    through `warn` and (with `move_aside`: on one process only) renamed to `<name>.corrupt`: kept for
    inspection, but out of the numbered set, so pruning never keeps it in place of a good checkpoint."""
    for path in reversed(checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except FileNotFoundError:  # moved aside by another process meanwhile
            continue
        except CheckpointError as e:
            aside = path.with_name(path.name + ".corrupt")
            if move_aside:
                path.replace(aside)
            warn(f"skipping corrupt checkpoint {path} ({e})" + (f"; moved aside to {aside.name}" if move_aside
                                                                  else "") + "; trying the one before it")
    return None


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
    meta["sha256"] = tensors_sha256(tensors)
    save_state_dict(tensors, path, metadata={"t2i_train": json.dumps(meta)})


def load_checkpoint(path: str | Path, *, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], restore_rng: bool = True) -> dict[str, Any]:
    """Verify a checkpoint, then restore modules, optimizers and RNG states in place; returns the
    metadata (step, data_position, config)."""
    tensors, meta = verify_checkpoint(path)
    for name, mod in modules.items():
        pre = name + "."
        mod.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    for name, opt in optimizers.items():
        _optimizer_from_flat(f"optim.{name}", opt, meta["optimizers"][name], tensors)
    if restore_rng:
        set_rng_state(tensors, meta["rng"])
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    if Path(path).is_dir():
        return json.loads((Path(path) / SHARDED_META).read_text())
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("t2i_train")
    if raw is None:
        raise ValueError(f"{path}: not a t2i training checkpoint (no 't2i_train' metadata)")
    return json.loads(raw)


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (the newest is always kept)."""
    for p in checkpoints(run_dir)[:-max(keep, 1)]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


