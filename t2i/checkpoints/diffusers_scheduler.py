"""Reading and writing diffusers' ``scheduler/scheduler_config.json`` as a ScheduleConfig.

The config's ``_class_name`` names the scheduler the pipeline was saved with (often PNDM);
t2i ignores it: the sampler is chosen at generation time and the settings read here
(betas, prediction type, spacing, ...) describe the model. What the file leaves out is read as
``<Class>.from_config(that config)`` reads it for the class a sampler mirrors: a setting whose
default differs between classes (``PER_CLASS_SETTINGS``: spacing, clip_sample,
set_alpha_to_one) stays None and takes that class's default when the sampler is chosen
(``class_defaults=True``); every other missing key has the same default in every class.
Settings that would change the result and that t2i does not implement are refused with a
clear error instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from t2i.diffusion.schedules import PER_CLASS_SETTINGS, ScheduleConfig
from t2i.samplers.diffusers_plan import LCM_SETTINGS

# diffusers' own keys (class_defaults is t2i's note on how to read the others)
_FIELDS = {f.name for f in dataclasses.fields(ScheduleConfig)} - {"class_defaults"}

# key -> the values t2i supports (anything else is refused)
_UNSUPPORTED_UNLESS = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "use_lu_lambdas": (False, None),
    "use_flow_sigmas": (False, None),
    "use_dynamic_shifting": (False, None),
    "final_sigmas_type": ("zero", "sigma_min", None),
    "variance_type": ("fixed_small", "fixed_small_log", None),
}
# LCMScheduler's settings the lcm sampler reads while ScheduleConfig has no field for them: only
# their defaults (every released LCM folder's values) are accepted.
_UNSUPPORTED_UNLESS.update({key: (value, None) for key, value in LCM_SETTINGS.items() if key not in _FIELDS})


class SchedulerConfigError(ValueError):
    """A scheduler config that is missing, malformed or asks for something unsupported."""


def scheduler_config_from_dict(raw: dict[str, Any], source: str = "scheduler config") -> ScheduleConfig:
    """Map a diffusers scheduler config dict onto ScheduleConfig, refusing unsupported settings."""
    for key, allowed in _UNSUPPORTED_UNLESS.items():
        if key in raw and raw[key] not in allowed:
            raise SchedulerConfigError(
                f"{source}: {key}={raw[key]!r} is not supported by t2i (supported: {allowed})"
            )
    kwargs = {k: v for k, v in raw.items() if k in _FIELDS}
    for key in PER_CLASS_SETTINGS:
        if key not in kwargs:
            kwargs[key] = None  # the sampler's diffusers class decides
        elif key != "timestep_spacing" and kwargs[key] is None:
            kwargs[key] = False  # an explicit null is falsy in diffusers: no clipping, acp[0] at the end
    if kwargs.get("lambda_min_clipped") is not None and math.isinf(kwargs["lambda_min_clipped"]):
        kwargs["lambda_min_clipped"] = None  # diffusers writes -Infinity for "no clipping"
    for key in ("num_train_timesteps", "steps_offset"):
        if key in kwargs and not isinstance(kwargs[key], int):
            raise SchedulerConfigError(f"{source}: {key} must be an integer, got {kwargs[key]!r}")
    return ScheduleConfig(**kwargs, class_defaults=True)


def read_scheduler_config(path: str | Path) -> ScheduleConfig:
    """Read a diffusers scheduler config.

    Args:
        path: a model folder (reads ``scheduler/scheduler_config.json``), a ``scheduler``
            folder, or the JSON file itself.
    """
    path = Path(path)
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json", path):
        if candidate.is_file():
            break
    else:
        raise SchedulerConfigError(f"no scheduler/scheduler_config.json in {path}")
    try:
        raw = json.loads(candidate.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SchedulerConfigError(f"{candidate}: not a readable JSON file ({err})") from err
    if not isinstance(raw, dict):
        raise SchedulerConfigError(f"{candidate}: expected a JSON object")
    return scheduler_config_from_dict(raw, str(candidate))


def scheduler_config_dict(cfg: ScheduleConfig, class_name: str = "DDIMScheduler") -> dict[str, Any]:
    """A diffusers-readable config for cfg (unset fields are left out, infinities dropped)."""
    out: dict[str, Any] = {"_class_name": class_name}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in _FIELDS:
            continue
        if value is None or (isinstance(value, float) and math.isinf(value)):
            continue
        out[f.name] = value
    return out


def write_scheduler_config(
    cfg: ScheduleConfig, folder: str | Path, class_name: str = "DDIMScheduler"
) -> Path:
    """Write ``folder/scheduler_config.json``; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scheduler_config.json"
    path.write_text(json.dumps(scheduler_config_dict(cfg, class_name), indent=2) + "\n")
    return path
