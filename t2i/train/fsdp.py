"""FSDP (PyTorch's `fully_shard`, "FSDP2") in the one training loop, and its sharded checkpoints.

`--parallel fsdp` under torchrun: each module a family passes to `Run.parallel` is sharded in place
(every element of its nn.ModuleLists, then the module itself: one all-gather per block in forward,
one reduce-scatter per block in backward, gradients averaged over the ranks as DDP does), so each
rank holds 1/W of its weights, gradients and optimizer state. Three things about a family's build
that FSDP changes, all handled here rather than in every family:

- `fully_shard` replaces the parameters by DTensors, so the optimizers the family made before
  `Run.parallel` are pointed at the new parameters (`rebind_optimizers`, before any step);
- the EMA copy is sharded the same way, so its update stays a local lerp of shards (`shard_module`);
- rank-0-only work that needs whole weights (sample grids, periodic exports, evaluations) is not
  done during the run: convert a checkpoint with `t2i convert RUN/checkpoints/step_N.dcp OUT`.

Checkpoints are `torch.distributed.checkpoint` (DCP) directories `checkpoints/step_N.dcp`, each
rank writing its own shards: tensors only (DCP pickles non-tensor values and reads them back with
`torch.load(weights_only=False)`, which we never do), the rest (step, data position, config,
optimizer hyper-parameters, every rank's RNG states, a SHA-256 of every file) as JSON beside them.
A save is written under a hidden name and renamed when complete, as the single-file checkpoints are.
DCP's own index (`.metadata`) is a pickle: it is read with an unpickler that builds only DCP's
metadata dataclasses and torch's sizes and dtypes (`SafeReader`), so a checkpoint cannot run code.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from t2i.train.checkpoint import SHARDED_META, file_sha256, rng_state, set_rng_state, verify_sharded
from t2i.train.distributed import DistInfo

ParamMap = dict[int, nn.Parameter]  # id(parameter before sharding) -> its sharded replacement


# The families whose sharded checkpoints `t2i convert` turns into their model file (t2i.train.sharded_export):
# the others (their rank-0 exports, clip lists or adapter files built before sharding) refuse FSDP.
FAMILIES = ("ldm", "ddpm", "layout_ldm")


def _mesh(info: DistInfo):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (info.world_size,))


def shard_module(module: nn.Module, info: DistInfo, params: ParamMap | None = None) -> nn.Module:
    """`fully_shard` every block (a non-leaf element of one of `module`'s nn.ModuleLists, innermost
    first), then `module`, in place. Leaf elements (a Linear in a list of projections) stay with their
    parent: a unit of their own would add a collective for one matrix, and FSDP's backward hook on a
    unit's output is lost if the caller changes that output in place. Records in `params` which sharded
    parameter replaced which original one."""
    from torch.distributed.fsdp import fully_shard

    before = dict(module.named_parameters())
    mesh = _mesh(info)
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    for block in (b for lst in reversed(lists) for b in lst):
        if next(block.children(), None) is not None and any(p.requires_grad for p in block.parameters()):
            fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    if params is not None:
        after = dict(module.named_parameters())
        params.update({id(p): after[name] for name, p in before.items()})
    return module


def rebind_optimizers(optimizers: dict[str, torch.optim.Optimizer], params: ParamMap) -> None:
    """Point optimizers made before sharding at the sharded parameters (they hold no state yet)."""
    for name, opt in optimizers.items():
        if opt.state:
            raise RuntimeError(f"optimizer {name!r} has taken steps before FSDP sharding")
        for group in opt.param_groups:
            group["params"] = [params.get(id(p), p) for p in group["params"]]


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm clip_grad_norm_ returns over sharded gradients (a DTensor) as a plain tensor."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ---- sharded checkpoints -------------------------------------------------------------------------

class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata dataclasses and enums, torch.Size, dtypes, layouts (by name, through
    torch.serialization._get_layout) and paths; refuses every other global (a function or class a
    crafted pickle would call)."""

    ALLOWED = frozenset({("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                         ("pathlib", "WindowsPath"), ("collections", "OrderedDict")})

    def find_class(self, module: str, name: str) -> Any:
        # Only modules that torch or the standard library have imported anyway: a crafted index
        # naming another module must not get it imported (its import could run code).
        if not (module.startswith(("torch.", "pathlib", "collections")) or module == "torch"):
            raise pickle.UnpicklingError(f"a sharded checkpoint's index may not refer to {module}.{name}")
        obj = super().find_class(module, name)
        if module.startswith("torch.distributed.checkpoint.") and isinstance(obj, type) and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
        if obj is torch.Size or isinstance(obj, (torch.dtype, torch.memory_format)) or (module, name) in self.ALLOWED:
            return obj
        raise pickle.UnpicklingError(f"a sharded checkpoint's index may not refer to {module}.{name}")


def safe_reader(path: Path):
    """DCP's FileSystemReader with its `.metadata` read by `_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _state(modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]
           ) -> tuple[dict[str, torch.Tensor], dict[str, Any], nn.Module]:
    """Every module's (sharded) weights and every optimizer's state as one flat dict of tensors:
    `<module>.<param>` (the keys of the single-file checkpoints) and `optim.<optimizer>.<param>.<key>`;
    the optimizers' non-tensor parts as JSON-able values. Initialises optimizer state that is still
    empty (a step with zero gradients and learning rate 0), so that a load has somewhere to go."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root = nn.ModuleDict(modules)
    tensors: dict[str, torch.Tensor] = dict(get_model_state_dict(root))
    rest: dict[str, Any] = {}
    for name, opt in optimizers.items():
        osd = get_optimizer_state_dict(root, opt)
        rest[name] = {"param_groups": osd["param_groups"], "state": {}}
        for fqn, st in osd["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim.{name}.{fqn}.{k}"] = v
                else:
                    rest[name]["state"].setdefault(fqn, {})[k] = v
    return tensors, rest, root


def _rng_json() -> dict[str, Any]:
    tensors, meta = rng_state()
    return {**meta, "torch": tensors["rng.torch"].tolist()}


def _set_rng_json(state: dict[str, Any]) -> None:
    set_rng_state({"rng.torch": torch.tensor(state["torch"], dtype=torch.uint8)}, state)


def save_sharded(path: Path, *, step: int, data_position: int, config: dict[str, Any], family: str,
                 modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], info: DistInfo) -> None:
    """Write checkpoint directory `path` (collective: every rank calls it with its shards)."""
    import torch.distributed.checkpoint as dcp

    tmp = path.with_name(f".tmp-{path.name}")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    tensors, rest, _ = _state(modules, optimizers)
    dcp.save(tensors, checkpoint_id=str(tmp))
    (tmp / f"rng_rank{info.rank}.json").write_text(json.dumps(_rng_json()))
    dist.barrier()
    if info.is_main:
        files = sorted(p.name for p in tmp.iterdir())
        meta = {"step": step, "data_position": data_position, "config": config, "family": family,
                "world_size": info.world_size, "optimizers": rest,
                "sha256": {f: file_sha256(tmp / f) for f in files}}
        with open(tmp / SHARDED_META, "w") as f:
            f.write(json.dumps(meta))
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.rmtree(path)
        tmp.replace(path)
    dist.barrier()


def load_sharded(path: Path, *, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                 info: DistInfo) -> dict[str, Any]:
    """Restore modules, optimizers and this rank's RNG states from a checkpoint directory (collective);
    returns its metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    meta = verify_sharded(path)
    tensors, _, root = _state(modules, optimizers)
    dcp.load(tensors, storage_reader=safe_reader(path))
    set_model_state_dict(root, {k: v for k, v in tensors.items() if not k.startswith("optim.")})
    for name, opt in optimizers.items():
        saved = meta["optimizers"][name]
        state: dict[str, dict[str, Any]] = {fqn: dict(st) for fqn, st in saved["state"].items()}
        prefix = f"optim.{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                fqn, k = key[len(prefix):].rsplit(".", 1)
                state.setdefault(fqn, {})[k] = value
        set_optimizer_state_dict(root, opt, {"state": state, "param_groups": saved["param_groups"]})
    rng = path / f"rng_rank{info.rank}.json"
    _set_rng_json(json.loads((rng if rng.is_file() else path / "rng_rank0.json").read_text()))
    return meta
