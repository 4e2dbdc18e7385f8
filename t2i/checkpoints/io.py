"""Reading and writing weight files safely.

safetensors is the format we write and prefer to read. Pickled files (`.bin`, `.ckpt`, `.pt`)
are only ever opened with `torch.load(weights_only=True)`, which refuses any pickle that
wants to import or call something, so no code hidden in a checkpoint runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class CheckpointError(ValueError):
    """A weight file that cannot be read safely; the message names the file and the problem."""


# Bytes per element of each safetensors dtype.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def parse_json(raw: str | bytes, where: str | os.PathLike) -> Any:
    """json.loads with every failure (malformed, not UTF-8, nested past Python's recursion limit) as
    one CheckpointError naming `where`."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: malformed JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply") from None


def read_json_object(path: str | os.PathLike, what: str = "a JSON config") -> dict[str, Any]:
    """A JSON file that must hold an object (a config, an index): FileNotFoundError if it is missing,
    CheckpointError if it is malformed or holds a list, a string or a number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing ({what})")
    if path.stat().st_size > 16 * 2**20:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes is too large for {what}")
    return json_object(parse_json(path.read_bytes(), path), path)


def json_object(value: Any, where: str | os.PathLike) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(name: str, info: Any) -> tuple[int, int, int]:
    """(start, end, bytes the dtype and shape need) of one header entry; ValueError if malformed."""
    if not isinstance(info, dict) or info.get("dtype") not in ITEMSIZE:
        raise ValueError
    offsets, shape = info.get("data_offsets"), info.get("shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
            and isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise ValueError
    return offsets[0], offsets[1], math.prod(shape) * ITEMSIZE[info["dtype"]]


def check_safetensors_header(path: str | os.PathLike) -> dict:
    """Validate a safetensors file's header against its size before any tensor is read.

    A header that is not a JSON object of well-formed entries (dtype, integer shape and offsets),
    or that lies (offsets past the end of the file, overlapping or short tensors, sizes that do not
    match dtype x shape), is refused with a CheckpointError. Returns the header.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file size {size}")
        header = json_object(parse_json(f.read(n), f"{path}: safetensors header"), f"{path}: safetensors header")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map names to strings")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end, expected = _check_entry(name, info)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if not 0 <= start <= end <= data_size:
            raise CheckpointError(f"{path}: tensor {name!r} points past the end of the file "
                                  f"(bytes {start}..{end} of {data_size})")
        if end - start != expected:
            raise CheckpointError(f"{path}: tensor {name!r} holds {end - start} bytes but its dtype and "
                                  f"shape need {expected}")
        spans.append((start, end, name))
    spans.sort()
    for (_s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if s1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    return header


_META_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


_NORMAL_INITS = (torch.Tensor.normal_, torch.nn.init.normal_)  # nn.init's dispatches as itself


class _SkipMetaNormal(TorchFunctionMode):
    """`Tensor.normal_` on a meta tensor does nothing. A meta tensor has no values to draw, and its
    normal_ runs a Python decomposition that imports torch._dynamo on first use: 2.3-2.8 s of an SD
    1.5 load (the text encoder's embeddings), measured on 2 quiet AMD Zen 3 cores, session 15. The other
    nn.init functions have C++ meta kernels and cost nothing there."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        kwargs = kwargs or {}
        if func in _NORMAL_INITS:
            tensor = args[0] if args else kwargs.get("tensor")  # nn.init passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta_device() -> Iterator[None]:
    """Build modules on the meta device (no memory; `_SkipMetaNormal`), to be filled by
    `load_state_dict(..., assign=True)`."""
    with torch.device("meta"), _SkipMetaNormal():
        yield


def header_tensors(header: dict) -> dict[str, torch.Tensor]:
    """The tensors a checked safetensors header describes, as meta tensors (shape and dtype, no
    data): key maps and shape checks run on them before a byte of weights is read."""
    return {k: torch.empty(v["shape"], dtype=_META_DTYPES.get(v["dtype"], torch.uint8), device="meta")
            for k, v in header.items() if k != "__metadata__"}


def check_finite(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse weights holding NaN or Inf: they would only ever produce black images.

    One float32 sum per tensor first (NaN and Inf always make it non-finite, and it needs no
    boolean copy of the weights: a quarter of the cost on the SD U-Net); the element-wise check
    runs only on a tensor whose sum is not finite, since a huge finite tensor can overflow it."""
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t.sum(dtype=torch.float32)):
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{path}: tensor {name!r} contains NaN or Inf values")


def load_state_dict(path: str | os.PathLike, check_values: bool = True,
                    cast: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Read a weight file (safetensors, or a pickle through weights_only loading) into a dict.

    Without `cast` a safetensors file is memory-mapped (its tensors are views of the mapping). With
    `cast` (e.g. `t2i.compact.compact_cast`) each tensor is read, checked and cast one at a time
    through plain file reads, so only the cast tensors stay resident: a mapping would keep every
    page read resident for as long as any tensor of the file lives. Pickles are read whole first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors" and cast is not None:
        return _read_safetensors(path, check_safetensors_header(path), check_values, cast)
    if path.suffix == ".safetensors":
        check_safetensors_header(path)
        try:
            state = load_file(path)
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    elif path.suffix in PICKLE_SUFFIXES:
        state = _load_pickle(path)
    else:
        raise CheckpointError(f"{path}: unknown weight file type {path.suffix!r} "
                              "(expected .safetensors, .bin, .ckpt, .pt or .pth)")
    if check_values:
        check_finite(state, path)
    return state if cast is None else {k: cast(v) for k, v in state.items()}


def _read_safetensors(path: Path, header: dict, check_values: bool,
                      cast: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """`load_state_dict` with `cast`: the tensors of a checked safetensors file, one at a time, each
    read into its own buffer (little-endian, as the format and x86 are), checked and cast."""
    state = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dtype = _META_DTYPES.get(info["dtype"])
            if dtype is None:  # a dtype torch.frombuffer cannot view (fp8, unsigned): safetensors reads it
                with safe_open(str(path), framework="pt") as g:
                    t = g.get_tensor(name).clone()
            else:
                raw = torch.empty(end - start, dtype=torch.uint8)
                f.seek(8 + n + start)
                if f.readinto(raw.numpy()) != end - start:
                    raise CheckpointError(f"{path}: tensor {name!r} is cut short")
                t = raw.view(dtype).reshape(info["shape"])
            if check_values:
                check_finite({name: t}, path)
            state[name] = cast(t)
    return state


def load_pickle(path: Path) -> Any:
    """A pickle through `torch.load(weights_only=True)`: plain containers and tensors only; a pickle
    that wants to import or call something is a CheckpointError, and nothing of it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        # weights_only refused a global or a call: nothing of the file was executed.
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "Unsupported" in ln or "global" in ln.lower()), first[0] if first else "")
        detail = detail.split(" Please use")[0]  # torch's advice to allowlist the global is not ours to give
        raise CheckpointError(f"{path}: refused to load a pickle that wants to run code or import "
                              f"objects ({detail.strip()}); only plain tensors are accepted") from None
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from None


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    obj = load_pickle(path)
    # Original SD .ckpt files nest the weights under "state_dict".
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def new_file_mode() -> int:
    """0o666 less the process umask: the mode `open()` gives a new file (0o644 under the usual 022)."""
    try:  # Linux: read it without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> None:
    """Write safetensors atomically: to a temporary name first, then rename over the target. The file
    gets the mode any new file gets (safetensors' writer leaves 0o600: a model trained by one user
    that a server run by another could not read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    os.chmod(tmp, new_file_mode())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_with_config(state: dict[str, torch.Tensor], path: str | os.PathLike, config: dict, system: str) -> None:
    """A self-describing t2i weight file: `save_state_dict` with the resolved config as JSON under
    "t2i_config" and what the file is under "t2i_system" in the metadata."""
    save_state_dict(state, path, metadata={"t2i_config": json.dumps(config), "t2i_system": system})


def save_module(module: torch.nn.Module, path: str | os.PathLike, system: str) -> None:
    """`save_with_config` of a module with a dataclass `cfg`: its weights in float32, its config."""
    state = {k: v.detach().float() for k, v in module.state_dict().items()}
    save_with_config(state, path, dataclasses.asdict(module.cfg), system)


def read_config(path: str | os.PathLike, what: str, system: str | None = None) -> dict:
    """The "t2i_config" JSON of a file written by `save_with_config`; with `system`, its "t2i_system"
    must be that. `what` names the kind of file in the errors (FileNotFoundError, or ValueError for
    a file that is not one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # safetensors' own error types: not a safetensors file at all
        raise ValueError(f"{path}: not {what} (not a readable safetensors file)") from None
    if "t2i_config" not in meta:
        raise ValueError(f"{path}: not {what} (no 't2i_config' metadata)")
    if system is not None and meta.get("t2i_system") != system:
        raise ValueError(f"{path}: not {what} (its t2i_system is {meta.get('t2i_system')!r})")
    return json_object(parse_json(meta["t2i_config"], f"{path}: t2i_config metadata"), f"{path}: t2i_config metadata")


def system_file(path: str | os.PathLike) -> Path:
    """The weight file of a t2i model path: the file itself, or `model.safetensors` in a folder."""
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


def model_name(file: Path) -> str:
    """The name a model loaded from a t2i weight file goes by (PNG metadata, the server's model id): its
    folder's for `model.safetensors`, else the file's stem. (`t2i.load` names a shipped model by its own name.)"""
    return file.parent.name if file.name == "model.safetensors" else file.stem


def is_system_file(path: str | os.PathLike, system: str) -> bool:
    """Whether `path` (a file, or a folder holding model.safetensors) was written by `save_with_config`
    for `system`: the metadata only, never the weights (a family's cheap `detect`)."""
    file = system_file(path)
    if file.suffix != ".safetensors":
        return False
    try:
        read_config(file, f"a {system} file", system)
    except (FileNotFoundError, ValueError):  # not this family's: let the others judge it
        return False
    return True


def find_weights(folder: Path, stem: str, variant: str | None = None) -> list[Path]:
    """The weight file(s) of one component folder, diffusers naming (`stem` e.g.
    "diffusion_pytorch_model" or "model"): a single safetensors/bin file, or the shards listed in
    a `.index.json` (each inside `folder`: see `shard_path`). safetensors wins over pickles when both
    exist."""
    suffix = f".{variant}" if variant else ""
    for ext in (".safetensors", ".bin"):
        single = folder / f"{stem}{suffix}{ext}"
        if single.is_file():
            return [single]
        index = folder / f"{stem}{suffix}{ext}.index.json"
        if index.is_file():
            weight_map = read_json_object(index, "a sharded weight index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
            return [shard_path(folder, s, index) for s in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"no weights in {folder} (looked for {stem}{suffix}.safetensors / .bin "
                            "and sharded .index.json)")


def shard_path(folder: Path, name: str, index: Path) -> Path:
    """`folder / name` for a shard named in an index, refused unless it names a file inside `folder`:
    an index is data from the download, and `/etc/passwd` or `../../x.safetensors` must not make a
    loader open files elsewhere. The check is on the name (relative, no `..`, no drive), not on
    resolved links, so a folder whose files are links into a download cache still loads."""
    pure = PurePosixPath(name)
    if (not name or pure.is_absolute() or PureWindowsPath(name).drive or "\\" in name
            or any(part in ("..", "") for part in name.split("/"))):
        raise CheckpointError(f"{index}: shard {name!r} is not a file name inside {folder}")
    return folder / pure


def load_component_weights(folder: Path, stem: str, variant: str | None = None,
                           cast: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one diffusers component folder, shards merged (each cast as read: `load_state_dict`)."""
    state: dict[str, torch.Tensor] = {}
    for f in find_weights(folder, stem, variant):
        state.update(load_state_dict(f, cast=cast))
    return state
