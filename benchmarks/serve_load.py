"""Load benchmark for `t2i serve`: throughput and p50/p95 latency at 1, 4 and 16 concurrent clients,
with batching off (--max-batch 1) and on, on 127.0.0.1 only.

    python benchmarks/serve_load.py                       # tiny random SD1-like model (needs diffusers)
    python benchmarks/serve_load.py --model PATH --size 64 --steps 8

Bounded: each client sends at most --requests requests, and each setting stops starting new ones
after --time-limit seconds. The server runs in this process (a uvicorn thread, as `t2i serve` runs
it); the clients are threads speaking plain HTTP to the A1111 route, each with its own seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def run_setting(url: str, clients: int, requests: int, time_limit: float, body: dict) -> dict:
    """`clients` threads, each sending up to `requests` txt2img requests back to back."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit

    def client(k: int) -> None:
        for i in range(requests):
            if time.monotonic() > deadline:
                return
            data = json.dumps({**body, "seed": 1000 * k + i}).encode()
            req = urllib.request.Request(url + "/sdapi/v1/txt2img", data=data,
                                         headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=max(30.0, time_limit * 2)) as r:
                    r.read()
                with lock:
                    latencies.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - count and report, keep the other clients going
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "done": len(latencies), "failed": len(failures), "seconds": wall,
            "throughput": len(latencies) / wall if wall else 0.0,
            "p50": percentile(latencies, 50) if latencies else float("nan"),
            "p95": percentile(latencies, 95) if latencies else float("nan"),
            "mean": statistics.fmean(latencies) if latencies else float("nan"),
            "errors": sorted(set(failures))[:3]}


def tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sd_oracles import build_sd1  # test-only: builds random weights with diffusers

    build_sd1(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model path (default: a tiny random SD1-like model)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="--max-batch values to compare")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per setting")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = p.parse_args(argv)

    import torch

    import t2i
    from t2i.serve.app import create_app
    from t2i.serve.background import BackgroundServer
    from t2i.serve.config import Limits, ServeConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_model(Path(tmp) / "sd1")
        pipe = t2i.load(path)
        body = {"prompt": "a red circle above a blue square", "steps": args.steps, "width": args.size,
                "height": args.size, "cfg_scale": 7.0}
        print(f"model {pipe.name}, {args.size}x{args.size}, {args.steps} steps, torch threads "
              f"{torch.get_num_threads()}, {args.requests} requests per client, limit {args.time_limit:.0f} s")
        print(f"{'max_batch':>9} {'clients':>7} {'done':>5} {'failed':>6} {'img/s':>7} {'p50 s':>7} {'p95 s':>7} "
              f"{'calls':>5}")
        for max_batch in args.batches:
            # Limits that admit the benchmark's requests whatever the model's native size (they follow it by default).
            limits = Limits(max_width=args.size, max_height=args.size, max_steps=max(150, args.steps),
                            max_pixel_steps=args.size**2 * args.steps)
            app = create_app(pipe, ServeConfig(max_queue=max(args.clients) + 1, max_batch=max_batch, limits=limits))
            with BackgroundServer(app) as server:
                # one warm-up request (first-call allocations) outside the measurement
                run_setting(server.url, 1, 1, args.time_limit, body)
                for clients in args.clients:
                    before = app.state.queue.batches
                    r = run_setting(server.url, clients, args.requests, args.time_limit, body)
                    calls = app.state.queue.batches - before
                    print(f"{max_batch:>9} {clients:>7} {r['done']:>5} {r['failed']:>6} {r['throughput']:>7.2f} "
                          f"{r['p50']:>7.3f} {r['p95']:>7.3f} {calls:>5}", flush=True)
                    for e in r["errors"]:
                        print(f"          error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
