"""Load benchmark for `t2i serve`: throughput and p50/p95 latency at 1, 4 and 16 concurrent clients,
with batching off (--max-batch 1) and on, on 127.0.0.1 only.

    python benchmarks/serve_load.py                       # tiny random SD1-like model (needs diffusers)
    python benchmarks/serve_load.py --model PATH --size 64 --steps 8

Bounded: each client sends at most --requests requests, and each setting stops starting new ones
after --time-limit seconds. The server runs in this process (a uvicorn thread, as `t2i serve` runs
it); the clients are threads speaking plain HTTP to the A1111 route, each with its own seed.

Distributed (`t2i serve --broker` + `t2i worker`): throughput with 1 and 2 worker processes, each on
--threads torch threads, behind one front (in this process) on a redis-server started here on a
free loopback port (Debian's binary; needs the `distributed` extra):

    python benchmarks/serve_load.py --workers 1 2 --threads 1 --clients 8 --size 64 --steps 20
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


def header(*first: str) -> str:
    """The table's column names: `first` ones, then every setting's results (calls last, when named)."""
    names = [n for n in first if n != "calls"] + ["clients", "done", "failed", "img/s", "p50 s", "p95 s"]
    names += ["calls"] if "calls" in first else []
    widths = {"img/s": 7, "p50 s": 7, "p95 s": 7}  # as wide as the numbers under them
    return " ".join(f"{n:>{widths.get(n, max(5, len(n)))}}" for n in names)


def request_body(args: argparse.Namespace) -> dict:
    return {"prompt": "a red circle above a blue square", "steps": args.steps, "width": args.size,
            "height": args.size, "cfg_scale": 7.0}


def serve_config(args: argparse.Namespace, max_batch: int, broker: str | None = None):
    """The server's settings, with limits that admit the benchmark's requests whatever the model's
    native size (they follow it by default)."""
    from t2i.serve.config import Limits, ServeConfig

    limits = Limits(max_width=args.size, max_height=args.size, max_steps=max(150, args.steps),
                    max_pixel_steps=args.size**2 * args.steps)
    return ServeConfig(max_queue=max(args.clients) + 1, max_batch=max_batch, limits=limits, broker=broker)


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
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="distributed mode: worker process counts to compare (each with --threads threads)")
    args = p.parse_args(argv)
    if args.workers:
        return distributed(args)

    import torch

    import t2i
    from t2i.serve.app import create_app
    from t2i.serve.background import BackgroundServer

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_model(Path(tmp) / "sd1")
        pipe = t2i.load(path)
        body = request_body(args)
        print(f"model {pipe.name}, {args.size}x{args.size}, {args.steps} steps, torch threads "
              f"{torch.get_num_threads()}, {args.requests} requests per client, limit {args.time_limit:.0f} s")
        print(header("max_batch", "calls"))
        for max_batch in args.batches:
            app = create_app(pipe, serve_config(args, max_batch))
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


def start_redis(folder: Path):
    """(process, url): redis-server on a free loopback port, nothing saved to disk."""
    import shutil
    import socket
    import subprocess

    import redis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("the distributed benchmark needs redis-server (apt-get install -y redis-server)")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL)
    db = redis.Redis(port=port)
    for _ in range(100):
        try:
            db.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def distributed(args: argparse.Namespace) -> int:
    """Throughput at each worker count: fresh redis-server and workers per count, one front."""
    import os
    import subprocess

    import t2i
    from t2i.serve.app import create_app
    from t2i.serve.background import BackgroundServer
    from t2i.serve.distributed import wait_for_model

    threads = args.threads or 1
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_model(Path(tmp) / "sd1")
        body = request_body(args)
        print(f"distributed: {args.size}x{args.size}, {args.steps} steps, {threads} torch thread(s) per worker, "
              f"{args.requests} requests per client, limit {args.time_limit:.0f} s, cpu: {t2i.cpu_description()}")
        print(header("workers", "max_batch"))
        for n in args.workers:
            for max_batch in args.batches:
                redis_proc, url = start_redis(Path(tmp))
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                workers = [subprocess.Popen([sys.executable, "-m", "t2i.cli", "worker", "--broker", url, "--model",
                                             str(path), "--threads", str(threads), "--max-batch", str(max_batch)],
                                            env=env, stdout=subprocess.DEVNULL) for _ in range(n)]
                try:
                    pipe = wait_for_model(url, None, timeout=120, say=lambda _m: None)
                    app = create_app(pipe, serve_config(args, max_batch, broker=url))
                    with BackgroundServer(app) as server:
                        wait_workers(app.state.queue, n)
                        for _ in range(n):  # warm-up (first-call allocations) on every worker
                            run_setting(server.url, n, 1, args.time_limit, body)
                        for clients in args.clients:
                            r = run_setting(server.url, clients, args.requests, args.time_limit, body)
                            print(f"{n:>7} {max_batch:>9} {clients:>7} {r['done']:>5} {r['failed']:>6} "
                                  f"{r['throughput']:>7.2f} {r['p50']:>7.3f} {r['p95']:>7.3f}", flush=True)
                            for e in r["errors"]:
                                print(f"          error: {e}")
                finally:
                    for w in workers:
                        w.terminate()
                    for w in workers:
                        w.wait(30)
                    redis_proc.terminate()
                    redis_proc.wait(10)
    return 0


def wait_workers(queue, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(queue.workers()) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(queue.workers())} of {n} workers came up")
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
