"""t2i against diffusers (and OpenVINO when installed) on the SD 1.5 architecture, on this CPU.

    python benchmarks/sd15_cpu.py                           # the default parts, 256 and 512
    python benchmarks/sd15_cpu.py --size 256 --only unet    # one part, one size
    python benchmarks/sd15_cpu.py --size 256 --only command --repeats 1
    python benchmarks/sd15_cpu.py --size 512 --only deepcache,fewstep   # the step-saving paths (issue 7)
    python benchmarks/sd15_cpu.py --size 256 --only compile --repeats 3 --threads 1   # torch.compile against eager
    python benchmarks/sd15_cpu.py --size 64 --only fewstep --repeats 1 --threads 1   # a smoke run
    python benchmarks/sd15_cpu.py --size 512 --only command --repeats 1 --steps 2   # peak RSS at 512 sooner

The model is SD 1.5's exact architecture with random weights (`sd15_folder.py`, built once under
/tmp): speed does not depend on the weights' values. The job is batch 1 with classifier-free
guidance (the U-Net runs on a batch of 2), 20 steps of DPM++ 2M, guidance 7.5 (--steps changes the steps).

Parts (--only, comma-separated):
  matmul   fp32 and bf16 2048x2048 matmul rates, the yardsticks for the U-Net's FLOP/s
  text     text encoding of a prompt and the empty negative
  unet     one guided U-Net step (batch 2), t2i's sampling network against diffusers' U-Net;
           achieved FLOP/s (torch.utils.flop_counter) as a fraction of the matmul rates
  vae      VAE decode of one latent
  load     a whole process that imports and loads the model, each side
  command  `t2i generate` against `diffusers_generate.py` and, where --openvino-python has it, OpenVINO
           (`openvino_generate.py`, its default precision and NNCF 8-bit weights), each a whole process,
           alternated: wall time, peak RSS, and the final latents compared with diffusers' fp32 result
           (and with diffusers' modules cast to bf16, the fairness yardstick, where bf16 is native)
  openvino t2i's warm image against OpenVINO's (optimum-intel, `openvino_generate.py`), the latter in
           --openvino-python when given: export, load + compile, first and warm image, peak RSS

Not in the default run (each times whole 20-step generations, several minutes at 512); name them in --only:
  deepcache t2i's whole guided generate with deepcache=1 (plain) against deepcache=2 and 3: seconds,
           speed-up, and how far the final latents move from the plain run's
  fewstep  4 steps without guidance + the preview decoder against the default 20-step job, then the
           decode alone, VAE decoder against preview decoder: seconds and FLOPs of each decoder
  compile  t2i's whole guided generate, eager against `pipe.compile()` (torch.compile, frozen
           weights), alternated in one process: the compile's cost, seconds, and the latents' difference

Machines are noisy (other jobs share the cores): every comparison alternates the two sides
and prints medians and ratios from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd15_folder import DEFAULT_FOLDER, build_sd15_folder  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
DEFAULT_PARTS = ("matmul", "text", "unet", "vae", "load", "command", "openvino")
PARTS = (*DEFAULT_PARTS, "deepcache", "fewstep", "compile")
HERE = Path(__file__).resolve().parent
JOB = dict(steps=20, guidance=7.5, sampler="dpmpp_2m", seed=0)  # the job, at each --size


def job_title(size: int) -> str:
    """The job in words, for the reports."""
    return f"{size}x{size}, {JOB['steps']} steps {JOB['sampler']}, guidance {JOB['guidance']}"


def job(size: int, **changes) -> dict:
    """generate() keyword arguments of the benchmark's job at size x size (with `changes` applied)."""
    return {**JOB, "width": size, "height": size, **changes}


def job_flags(size: int) -> list[str]:
    """The same job as command-line flags, but the sampler (each command names its own or has one)."""
    return ["--steps", str(JOB["steps"]), "--guidance", str(JOB["guidance"]), "--width", str(size),
            "--height", str(size), "--seed", str(JOB["seed"])]


# ---------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(sides: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict[str, float]:
    """Median seconds of each side, the sides run in turn (A B A B ...) so load changes hit both."""
    if warmup:
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(title: str, medians: dict[str, float], base: str = "diffusers fp32", speedup: bool = False) -> None:
    """One line per side; the others' time as a fraction of base's (and as a speed-up factor)."""
    print(f"  {title}")
    for name, s in medians.items():
        ratio = ""
        if base in medians and name != base:
            faster = f", {medians[base] / s:.2f}x faster" if speedup else ""
            ratio = f"  ({s / medians[base]:.2f} of {base}{faster})"
        print(f"    {name:<22} {s:8.3f} s{ratio}")


def matmul_rate(dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """GFLOP/s of an n x n matmul in dtype (median of repeats after one warm-up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    s = alternate({"mm": lambda: a @ b}, repeats)["mm"]
    return 2 * n**3 / s / 1e9


# ---------------------------------------------------------------------------------------
# Loading both sides in this process
# ---------------------------------------------------------------------------------------


class Sides:
    """The t2i pipeline and the diffusers pipeline, loaded on first use."""

    def __init__(self, folder: Path, precision: str, compile: bool = False) -> None:
        import t2i

        self.folder, self.precision, self.compile = folder, precision, compile
        resolved = t2i.resolve_precision(precision, folder, quantizable=not compile)  # int8 does not compile
        self.label = (f"t2i {resolved}" + (" (auto)" if precision == "auto" else "")
                      + (" compiled" if compile else ""))
        self._t2i = self._diffusers = self._diffusers_bf16 = None

    @property
    def t2i(self):
        if self._t2i is None:
            import t2i

            self._t2i = t2i.load(self.folder, precision=self.precision, quantizable=not self.compile)
            if self.compile:
                self._t2i.compile()  # compiled on the first call: the warm-up run of each part
        return self._t2i

    def diffusers(self, bf16: bool = False):
        from diffusers import StableDiffusionPipeline

        if bf16:
            if self._diffusers_bf16 is None:
                self._diffusers_bf16 = StableDiffusionPipeline.from_pretrained(
                    self.folder, safety_checker=None, local_files_only=True, torch_dtype=torch.bfloat16)
            return self._diffusers_bf16
        if self._diffusers is None:
            self._diffusers = StableDiffusionPipeline.from_pretrained(self.folder, safety_checker=None,
                                                                      local_files_only=True)
        return self._diffusers


def meta_flops(run: Callable[[], object]) -> int:
    """FLOPs of run(), which builds a network and calls it, counted by torch.utils.flop_counter on
    the meta device (shapes only: no weights, no arithmetic, so even the SD VAE counts in a moment)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def unet_flops(folder: Path, latent: int) -> int:
    """FLOPs of one U-Net forward on a batch of 2 (guidance) at latent x latent."""
    from t2i.checkpoints.diffusers_nets import unet_config_from_diffusers
    from t2i.nets.unet import UNet

    cfg = unet_config_from_diffusers(json.loads((folder / "unet" / "config.json").read_text()))
    return meta_flops(lambda: UNet(cfg)(torch.randn(2, 4, latent, latent), torch.full((2,), 500.0),
                                        torch.randn(2, 77, 768)))


# ---------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------


def part_matmul(state: dict, args) -> None:
    native = state["native_bf16"]
    state["fp32_rate"] = matmul_rate(torch.float32, 2048)
    # Without native bf16 a 2048^3 bf16 matmul is emulated and takes minutes: measure a 512 one.
    n = 2048 if native else 512
    state["bf16_rate"] = matmul_rate(torch.bfloat16, n, repeats=1 if not native else 3)
    print(f"  matmul 2048x2048 fp32: {state['fp32_rate']:.1f} GFLOP/s; bf16 ({n}x{n}): "
          f"{state['bf16_rate']:.1f} GFLOP/s{'' if native else ' (no native bf16 on this CPU)'}")


def part_text(state: dict, args, sides: Sides) -> None:
    pipe, ref = sides.t2i, sides.diffusers()
    with torch.no_grad():
        medians = alternate({
            "t2i": lambda: pipe.text_encoder.encode([PROMPT, ""]),
            "diffusers fp32": lambda: ref.encode_prompt(PROMPT, "cpu", 1, True, ""),
        }, args.repeats)
    report("text encoding (prompt + empty negative)", medians)


def part_unet(state: dict, args, sides: Sides, size: int) -> None:
    latent = size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g)
    t = torch.full((2,), 500.0)
    ctx = torch.randn(2, 77, 768, generator=g)
    net = sides.t2i._sampling_net()  # exactly what generate() calls
    ref = sides.diffusers().unet
    runs = {sides.label: lambda: net(x, t, context=ctx),
            "diffusers fp32": lambda: ref(x, t, encoder_hidden_states=ctx)}
    if state["native_bf16"] or args.force_bf16:
        ref16 = sides.diffusers(bf16=True).unet
        runs["diffusers bf16"] = lambda: ref16(x.bfloat16(), t, encoder_hidden_states=ctx.bfloat16())
    with torch.no_grad():
        medians = alternate(runs, args.repeats)
    report(f"U-Net step, batch 2 (guidance), {size}x{size}", medians)
    flops = unet_flops(sides.folder, latent)
    print(f"    U-Net FLOPs per step: {flops / 1e9:.0f} GFLOP")
    for name, s in medians.items():
        rate = flops / s / 1e9
        line = f"    {name:<22} {rate:7.1f} GFLOP/s"
        if "fp32_rate" in state:
            line += (f" = {rate / state['fp32_rate']:.0%} of the fp32 matmul, "
                     f"{rate / state['bf16_rate']:.0%} of the bf16 matmul")
        print(line)


def part_vae(state: dict, args, sides: Sides, size: int) -> None:
    latent = size // 8
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    pipe, ref = sides.t2i, sides.diffusers()
    with torch.no_grad():
        medians = alternate({
            sides.label: lambda: pipe.decode(z),
            "diffusers fp32": lambda: ref.vae.decode(z / ref.vae.config.scaling_factor),
        }, args.repeats)
    report(f"VAE decode {size}x{size}", medians)


def run_process(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB, output) of one whole process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-2000:]}")
    return wall, usage.ru_maxrss / 2**20, out  # ru_maxrss is in KiB on Linux


def byte_compile_t2i() -> None:
    """Write t2i's .pyc files, as a (non-editable) pip install does for every package, diffusers and
    OpenVINO included. An editable install under PYTHONDONTWRITEBYTECODE=1 (set on this project's
    machines) has none, and then every t2i process compiled its modules from source: 0.6 s of an SD
    1.5 load (session 15). py_compile writes them whatever that variable says."""
    import compileall

    import t2i

    compileall.compile_dir(str(Path(t2i.__file__).parent), quiet=1)


def part_load(state: dict, args, folder: Path) -> None:
    code_t2i = f"import t2i; t2i.load({str(folder)!r}, precision={args.precision!r})"
    code_diff = ("from diffusers import StableDiffusionPipeline; StableDiffusionPipeline.from_pretrained("
                 f"{str(folder)!r}, safety_checker=None, local_files_only=True)")
    results: dict[str, list[tuple[float, float]]] = {"t2i": [], "diffusers fp32": []}
    for _ in range(args.repeats):
        for name, code in (("t2i", code_t2i), ("diffusers fp32", code_diff)):
            wall, rss, _ = run_process([sys.executable, "-c", code])
            results[name].append((wall, rss))
    medians = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    report("load: a process that imports and loads the pipeline", medians)
    for k, v in results.items():
        print(f"    {k:<22} peak RSS {max(r for _, r in v):.2f} GB")


def _latent_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| relative to the reference's standard deviation."""
    return ((a - ref).abs().max() / ref.std()).item()


def openvino_python(args) -> str | None:
    """The python that runs `openvino_generate.py` (--openvino-python, else this one), or None (with a
    line saying why) where it cannot import optimum-intel and openvino."""
    python = args.openvino_python or sys.executable
    probe = subprocess.run([python, "-c", "import optimum.intel, openvino"], capture_output=True, text=True)
    if probe.returncode == 0:
        return python
    print(f"  OpenVINO skipped: {python} cannot import optimum.intel and openvino (install them there: "
          "pip install 'optimum-intel[openvino]'; it pins its own transformers, so a venv of its own and "
          "--openvino-python suit it best)")
    return None


def psnr(a: Path, b: Path) -> float:
    """PSNR in dB between two 8-bit images of the same size."""
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) for f in (a, b))
    return float(10 * np.log10(255**2 / max(((x - y) ** 2).mean(), 1e-12)))


def export_once(cmd: list[str]) -> None:
    """Run an `openvino_generate.py` command line once as a 1-step job, untimed: its first use exports
    the folder to OpenVINO IR (minutes, cached beside the folder), as OpenVINO's users do once. (At
    64x64 the NNCF int8 IR failed to reshape: the job's own size is kept.)"""
    once = list(cmd)
    once[once.index("--steps") + 1] = "1"
    run_process(once)


def part_command(state: dict, args, folder: Path, size: int) -> None:
    """Whole processes, alternated: `t2i generate`, diffusers, and (where installed) OpenVINO with its
    own default precision and with 8-bit weights. OpenVINO's IR export is cached beside the folder
    and made before the timed runs, as a user of OpenVINO exports once."""
    from safetensors.torch import load_file

    tmp = Path(tempfile.mkdtemp(prefix="t2i_bench_"))
    flags = job_flags(size)
    t2i_cmd = [sys.executable, "-m", "t2i.cli", "generate", PROMPT, "--model", str(folder), "--sampler",
               JOB["sampler"], *flags, "--precision", args.precision, "--quiet", "--out", str(tmp / "t2i.png"),
               "--save-latents", str(tmp / "t2i.safetensors"), "--overwrite"]  # repeats write the same files
    diff_cmd = [sys.executable, str(HERE / "diffusers_generate.py"), PROMPT, "--model", str(folder), *flags,
                "--out", str(tmp / "diffusers.png"), "--save-latents", str(tmp / "diffusers.safetensors")]
    cmds = {Sides(folder, args.precision).label: t2i_cmd, "diffusers fp32": diff_cmd}
    python = openvino_python(args) if "openvino" in args.command_peers else None
    if python is not None:
        for name, extra in (("openvino", []), ("openvino int8", ["--int8"])):
            cmd = [python, str(HERE / "openvino_generate.py"), PROMPT, "--model", str(folder), *flags,
                   "--out", str(tmp / f"{name}.png"), *extra]
            if args.threads is not None:
                cmd += ["--threads", str(args.threads)]
            export_once(cmd)
            cmds[name] = cmd
    for name, cmd in cmds.items():
        print(f"  {name + ' command:':<24} {' '.join(cmd[1:])}")
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cmds}
    for _ in range(args.repeats):
        for name, cmd in cmds.items():
            wall, rss, out = run_process(cmd)
            runs[name].append((wall, rss))
            print(f"    {name:<22} {wall:8.1f} s  peak RSS {rss:.2f} GB  {out.strip().splitlines()[-1:] or ''}",
                  flush=True)
    medians = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    report(f"whole command {job_title(size)} (median)", medians)
    peaks = {k: max(r for _, r in v) for k, v in runs.items()}
    for k, v in peaks.items():
        print(f"    {k:<22} peak RSS {v:.2f} GB  ({v / peaks['diffusers fp32']:.2f} of diffusers fp32)")
    ours = load_file(tmp / "t2i.safetensors")["latents"]
    ref = load_file(tmp / "diffusers.safetensors")["latents"]
    print(f"  final latents, max |t2i - diffusers fp32| / std: {_latent_error(ours, ref):.2e}; decoded images "
          f"{psnr(tmp / 't2i.png', tmp / 'diffusers.png'):.1f} dB PSNR apart")
    if (state["native_bf16"] or args.force_bf16) and not args.no_yardstick:
        wall, _, _ = run_process([*diff_cmd[:-4], "--out", str(tmp / "d16.png"),
                                  "--save-latents", str(tmp / "d16.safetensors"), "--bf16"])
        yard = load_file(tmp / "d16.safetensors")["latents"]
        print(f"  yardstick, max |diffusers bf16 - diffusers fp32| / std: {_latent_error(yard, ref):.2e}, "
              f"{psnr(tmp / 'd16.png', tmp / 'diffusers.png'):.1f} dB PSNR ({wall:.0f} s)")
    elif not args.no_yardstick:
        print("  yardstick (diffusers cast to bf16) skipped: no native bf16 here, it would take hours; "
              "--force-bf16 runs it")


def part_openvino(state: dict, args, sides: Sides, size: int) -> None:
    """t2i's warm image against OpenVINO's (optimum-intel, `openvino_generate.py` in --openvino-python):
    t2i's warm images are timed here before and after the OpenVINO process, so both see the same load."""
    from safetensors.torch import load_file

    python = openvino_python(args)
    if python is None:
        return
    tmp = Path(tempfile.mkdtemp(prefix="t2i_bench_ov_"))
    latents: dict[str, torch.Tensor] = {}

    def t2i_image() -> None:
        latents["t2i"] = sides.t2i.generate(PROMPT, **job(size)).latents

    # openvino_generate.py always samples with DPM++ 2M, the job's sampler
    cmd = [python, str(HERE / "openvino_generate.py"), PROMPT, "--model", str(sides.folder), *job_flags(size),
           "--repeats", str(args.repeats), "--out", str(tmp / "openvino.png"),
           "--save-latents", str(tmp / "openvino.safetensors")]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    print(f"  OpenVINO command: {' '.join(cmd[1:])}", flush=True)
    before = alternate({"t2i": t2i_image}, args.repeats)["t2i"]
    wall, rss, out = run_process(cmd)
    after = alternate({"t2i": t2i_image}, args.repeats, warmup=False)["t2i"]
    ov = json.loads(out.strip().splitlines()[-1])
    if ov["export_s"]:
        print(f"    (first use: exported the folder to OpenVINO IR in {ov['export_s']:.0f} s, cached beside it)")
    medians = {f"{sides.label} (before)": before, "openvino": ov["warm_image_s"], f"{sides.label} (after)": after}
    report(f"warm image {job_title(size)} (median of {args.repeats})", medians,
           base="openvino")
    print(f"    openvino process: {ov['process_s']:.1f} s for one image (import {ov['import_s']:.1f} s, "
          f"load + reshape + compile {ov['load_compile_s']:.1f} s, first image {ov['first_image_s']:.1f} s), "
          f"peak RSS {rss:.2f} GB")
    ref = load_file(tmp / "openvino.safetensors")["latents"]
    print(f"  final latents, max |t2i - openvino| / std: {_latent_error(latents['t2i'], ref):.2e}")


def part_deepcache(state: dict, args, sides: Sides, size: int) -> None:
    pipe = sides.t2i
    latents: dict[str, torch.Tensor] = {}

    def with_interval(name: str, interval: int) -> Callable[[], None]:
        def run() -> None:
            # The same seed every call, so each side's latents are the same on every repeat.
            latents[name] = pipe.generate(PROMPT, **job(size, deepcache=interval)).latents
        return run

    base = "deepcache 1 (plain)"
    runs = {base: with_interval(base, 1), "deepcache 2": with_interval("deepcache 2", 2),
            "deepcache 3": with_interval("deepcache 3", 3)}
    medians = alternate(runs, args.repeats)
    report(f"{sides.label} generate {job_title(size)} (text, sampling, VAE decode)",
           medians, base=base, speedup=True)
    # DeepCache skips the deep levels on most steps, so the image changes; on random weights the size of
    # the change says little about a trained model's, but a blow-up would show here.
    for name in list(runs)[1:]:
        print(f"    {name:<22} final latents, max |difference from plain| / std: "
              f"{_latent_error(latents[name], latents[base]):.2e}")


def part_compile(state: dict, args, sides: Sides, size: int) -> None:
    import t2i

    # both sides at the precision `auto` gives a compiled model (int8 does not compile)
    eager = t2i.load(sides.folder, precision=sides.precision, quantizable=False)
    compiled = t2i.load(sides.folder, precision=sides.precision, quantizable=False)
    compiled.compile()
    latents: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    latents["compiled"] = compiled.generate(PROMPT, **job(size)).latents
    print(f"  first compiled image {size}x{size} (compiles the U-Net): {time.perf_counter() - start:.1f} s")

    def run(name: str, pipe) -> Callable[[], None]:
        return lambda: latents.__setitem__(name, pipe.generate(PROMPT, **job(size)).latents)

    medians = alternate({"eager": run("eager", eager), "compiled": run("compiled", compiled)}, args.repeats)
    report(f"{sides.label} generate {job_title(size)}", medians, base="eager",
           speedup=True)
    error = _latent_error(latents["compiled"], latents["eager"])
    print(f"    final latents, max |compiled - eager| / std: {error:.2e}")


def part_fewstep(state: dict, args, sides: Sides, size: int) -> None:
    from t2i.autoencoders.kl import AutoencoderKL
    from t2i.autoencoders.preview import PREVIEW_DECODER_CONFIGS, PreviewDecoder

    pipe = sides.t2i
    cfg = PREVIEW_DECODER_CONFIGS["sd"]
    if pipe.preview_decoder is None:
        # Random weights, float32 as `--preview-decoder` loads a trained one: speed does not depend on the values.
        pipe.preview_decoder = PreviewDecoder(cfg).eval().requires_grad_(False)
    base = f"{JOB['steps']} steps guided + VAE"
    medians = alternate({
        base: lambda: pipe.generate(PROMPT, **job(size)),
        # guidance 1.0 skips the unconditional half: the U-Net runs on a batch of 1.
        "4 steps + preview": lambda: pipe.generate(PROMPT, **job(size, steps=4, guidance=1.0, preview=True)),
    }, args.repeats)
    report(f"{sides.label} generate {job_title(size)}, VAE decode against "
           "4 steps, no guidance, preview decode", medians, base=base, speedup=True)

    latent = size // 8
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    vae_dtype = next(pipe.vae.parameters()).dtype
    vae_name = f"VAE decoder {'bf16' if vae_dtype == torch.bfloat16 else 'fp32'}"
    with torch.no_grad():
        medians = alternate({
            vae_name: lambda: pipe.decode(z),
            "preview decoder fp32": lambda: pipe.decode(z, preview=True),
        }, args.repeats)
    report(f"decode alone {size}x{size} (to PIL)", medians, base=vae_name, speedup=True)
    print("    (preview decoder: PreviewDecoder, the 'sd' preset (TAESD's shape), random weights: speed does "
          "not depend on their values)")
    flops = {vae_name: meta_flops(lambda: AutoencoderKL(pipe.vae.cfg).decode(torch.randn(1, 4, latent, latent))),
             "preview decoder fp32": meta_flops(lambda: PreviewDecoder(cfg)(torch.randn(1, 4, latent, latent)))}
    print(f"  decoder FLOPs per {size}x{size} image (torch.utils.flop_counter, free of machine noise)")
    for name, f in flops.items():
        ratio = f"  ({f / flops[vae_name]:.3f} of {vae_name})" if name != vae_name else ""
        print(f"    {name:<22} {f / 1e9:8.1f} GFLOP{ratio}")


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="256,512", help="image sizes, comma-separated (default 256,512)")
    p.add_argument("--only", default=",".join(DEFAULT_PARTS),
                   help=f"parts to run, from {', '.join(PARTS)} (default: all but deepcache, fewstep, compile)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per side (after one warm-up)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"], help="t2i's precision")
    p.add_argument("--compile", action="store_true", help="t2i's in-process parts (unet, openvino, deepcache, "
                   "fewstep) with pipe.compile(): torch.compile'd U-Net, compiled in each part's warm-up run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads here and OMP_NUM_THREADS in the processes started (default: torch's own)")
    p.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="where the random SD 1.5 folder lives")
    p.add_argument("--openvino-python", default=None,
                   help="python of an environment with optimum-intel and openvino (default: this one)")
    p.add_argument("--steps", type=int, default=JOB["steps"],
                   help="the job's sampling steps (default 20, the issue's job); fewer still measure load, decode "
                   "and peak RSS, which do not grow with the steps, in less time")
    p.add_argument("--command-peers", default="diffusers,openvino",
                   help="the command part's peers besides diffusers: 'diffusers,openvino' (default; OpenVINO where "
                   "--openvino-python imports it, with its default precision and with 8-bit weights) or 'diffusers'")
    p.add_argument("--no-yardstick", action="store_true", help="skip the command part's diffusers bf16 run")
    p.add_argument("--force-bf16", action="store_true",
                   help="run the diffusers bf16 yardstick even without native bf16 (very slow there)")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.only.split(",") if s.strip()]
    for part in parts:
        if part not in PARTS:
            p.error(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    sizes = [int(s) for s in args.size.split(",")]
    if args.steps < 1:
        p.error("--steps must be at least 1")
    JOB["steps"] = args.steps
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the `load` and `command` processes

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    import t2i

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    state: dict = {"native_bf16": t2i.native_bf16()}
    folder = build_sd15_folder(args.folder)
    print(f"t2i {t2i.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"native bf16: {state['native_bf16']}, VNNI: {t2i.has_vnni()}, t2i precision {args.precision} -> "
          f"{t2i.resolve_precision(args.precision, folder)}")
    byte_compile_t2i()
    sides = Sides(folder, args.precision, compile=args.compile)
    if "matmul" in parts:
        part_matmul(state, args)
    if "text" in parts:
        part_text(state, args, sides)
    if "load" in parts:
        part_load(state, args, folder)
    for size in sizes:
        print(f"== {size}x{size}")
        if "unet" in parts:
            part_unet(state, args, sides, size)
        if "vae" in parts:
            part_vae(state, args, sides, size)
        if "deepcache" in parts:
            part_deepcache(state, args, sides, size)
        if "fewstep" in parts:
            part_fewstep(state, args, sides, size)
        if "compile" in parts:
            part_compile(state, args, sides, size)
        if "command" in parts:
            part_command(state, args, folder, size)
        if "openvino" in parts:
            part_openvino(state, args, sides, size)


if __name__ == "__main__":
    main()
