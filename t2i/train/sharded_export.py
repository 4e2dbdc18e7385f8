"""A sharded FSDP checkpoint (`t2i.train.fsdp`) -> the single file its family ships (`t2i convert`).

Kept apart from `t2i.train.fsdp`, which the training loop imports: building a family here imports
the families, and each family imports the loop.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from t2i.train.checkpoint import verify_sharded
from t2i.train.distributed import DistInfo
from t2i.train.fsdp import FAMILIES, safe_reader


def _family(name: str) -> tuple[Any, Callable]:
    """A family's (config class, build) by its Task name, for building it outside its run."""
    if name == "ldm":
        from t2i.train.ldm import LDMTrainConfig, build_ldm
        return LDMTrainConfig, build_ldm
    if name == "ddpm":
        from t2i.train.ddpm import DDPMTrainConfig, build_ddpm
        return DDPMTrainConfig, build_ddpm
    if name == "layout_ldm":
        from t2i.train.layout_ldm import LayoutLDMTrainConfig, build_layout_ldm
        return LayoutLDMTrainConfig, build_layout_ldm
    raise ValueError(f"converting sharded checkpoints of the {name!r} family is not supported "
                     f"(families: {', '.join(FAMILIES)})")


def export_sharded(src: str | Path, dst: str | Path) -> Path:
    """A sharded checkpoint -> the file(s) its family exports (for the LDM: the EMA model as the
    `model.safetensors` that `t2i generate` loads). One process, no process group: DCP reassembles
    whole tensors from the shards. dst ending in `.safetensors`: that file; else a new folder."""
    import torch.distributed.checkpoint as dcp

    from t2i.train.fit import Run
    from t2i.train.loop import RunLog

    src, dst = Path(src), Path(dst)
    meta = verify_sharded(src)
    config_cls, build = _family(meta["family"])
    cfg = config_cls.from_dict(meta["config"])
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".convert-") as tmp:
        cfg.out, cfg.parallel = tmp, "ddp"
        torch.manual_seed(cfg.seed)
        log = RunLog(Path(tmp), DistInfo(), 0, 0, quiet=True)
        task = build(cfg, Run(DistInfo(), log))
        if task.export is None:
            raise ValueError(f"the {meta['family']} family has no export")
        state = {f"{name}.{k}": v for name, mod in task.modules.items() for k, v in mod.state_dict().items()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=safe_reader(src), no_dist=True)
        for name, mod in task.modules.items():
            mod.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
        before = set(Path(tmp).iterdir())
        task.export()
        made = sorted(set(Path(tmp).iterdir()) - before)
        if dst.suffix == ".safetensors":
            if len(made) != 1:
                raise ValueError(f"the {meta['family']} export writes {len(made)} files; give a folder as DST")
            made[0].replace(dst)
        else:
            dst.mkdir()
            for p in made:
                p.replace(dst / p.name)
        log.close()
    return dst
