"""The few-step job (issue 22, job 2): SD-Turbo's architecture at 512x512, 1 and 4 Euler steps without
guidance, decoded by TAESD; t2i against OpenVINO and diffusers, each a whole process, alternated.

    python benchmarks/turbo_cpu.py --openvino-python /tmp/ovenv/bin/python            # 1 and 4 steps
    python benchmarks/turbo_cpu.py --steps 1 --repeats 3 --threads 2 --openvino-python /tmp/ovenv/bin/python
    python benchmarks/turbo_cpu.py --size 128 --steps 1 --repeats 1 --peers diffusers  # a smoke run

The model is SD-Turbo's exact architecture (the SD 2.1 U-Net, OpenCLIP ViT-H/14's text tower) with
random weights and a random TAESD (`sd15_folder.py`, built once under /tmp): speed does not depend
on the weights' values. Each side is what its user would run with its defaults: `t2i generate
--preview-decoder TAESD` (precision `auto`), `diffusers_generate.py --taesd` (diffusers' float32),
`openvino_generate.py --taesd` (OpenVINO's own precision for the CPU; the IR exported once and cached
beside the folder, before the timed runs, as its users export once), and OpenVINO with NNCF 8-bit
weights. Printed: the CPU and its flags, each run's wall time and peak RSS, medians and ratios to
OpenVINO's default. See README "CPU speed" for measurements.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd15_cpu import PROMPT, byte_compile_t2i, export_once, openvino_python, report, run_process  # noqa: E402
from sd15_folder import TAESD_FOLDER, TURBO_FOLDER, build_taesd_folder, build_turbo_folder  # noqa: E402

HERE = Path(__file__).resolve().parent


def commands(args, folder: Path, taesd: Path, steps: int, tmp: Path) -> dict[str, list[str]]:
    """Each side's command line for the job at `steps`."""
    job = ["--steps", str(steps), "--guidance", "0", "--width", str(args.size), "--height", str(args.size),
           "--seed", "0"]
    cmds = {
        f"t2i {args.precision}": [sys.executable, "-m", "t2i.cli", "generate", PROMPT, "--model", str(folder),
                                  "--sampler", "euler", *job, "--preview-decoder", str(taesd), "--precision",
                                  args.precision, "--quiet", "--overwrite", "--out", str(tmp / "t2i.png")],
    }
    peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    if "diffusers" in peers:
        cmds["diffusers fp32"] = [sys.executable, str(HERE / "diffusers_generate.py"), PROMPT, "--model", str(folder),
                                  *job, "--scheduler", "euler", "--taesd", str(taesd), "--out",
                                  str(tmp / "diffusers.png")]
    python = openvino_python(args) if "openvino" in peers else None
    if python is not None:
        for name, extra in (("openvino", []), ("openvino int8", ["--int8"])):
            cmds[name] = [python, str(HERE / "openvino_generate.py"), PROMPT, "--model", str(folder), *job,
                          "--scheduler", "euler", "--taesd", str(taesd), "--out", str(tmp / f"{name}.png"), *extra]
            if args.threads is not None:
                cmds[name] += ["--threads", str(args.threads)]
    return cmds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="1,4", help="the jobs' step counts, comma-separated (default 1,4)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side and job, alternated")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"], help="t2i's precision")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the processes (and OpenVINO's INFERENCE_NUM_THREADS)")
    p.add_argument("--peers", default="openvino,diffusers", help="openvino and/or diffusers (default both)")
    p.add_argument("--openvino-python", default=None,
                   help="python of an environment with optimum-intel and openvino (default: this one)")
    p.add_argument("--folder", type=Path, default=TURBO_FOLDER)
    p.add_argument("--taesd", type=Path, default=TAESD_FOLDER)
    args = p.parse_args(argv)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import t2i

    folder, taesd = build_turbo_folder(args.folder), build_taesd_folder(args.taesd)
    byte_compile_t2i()
    print(f"CPU: {t2i.cpu_description()}; t2i precision {args.precision} -> "
          f"{t2i.resolve_precision(args.precision, folder)}; load: {os.getloadavg()[0]:.1f}")
    tmp = Path(tempfile.mkdtemp(prefix="t2i_turbo_"))
    for steps in [int(s) for s in args.steps.split(",")]:
        cmds = commands(args, folder, taesd, steps, tmp)
        for name, cmd in cmds.items():
            print(f"  {name + ':':<18} {' '.join(cmd[1:])}")
            if name.startswith("openvino"):
                export_once(cmd)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cmds}
        for _ in range(args.repeats):
            for name, cmd in cmds.items():
                wall, rss, _ = run_process(cmd)
                runs[name].append((wall, rss))
                print(f"    {name:<18} {wall:7.1f} s  peak RSS {rss:.2f} GB", flush=True)
        medians = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
        report(f"whole process, {args.size}x{args.size}, {steps} Euler step(s), no guidance, TAESD (median of "
               f"{args.repeats})", medians, base="openvino" if "openvino" in medians else "diffusers fp32")
        for k, v in runs.items():
            print(f"    {k:<22} peak RSS {max(r for _, r in v):.2f} GB")


if __name__ == "__main__":
    main()
