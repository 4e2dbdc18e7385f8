"""`t2i worker`: the command line of t2i.serve.worker (kept apart so `t2i --help` imports no torch)."""

from __future__ import annotations

import argparse
import signal
import threading


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run the jobs of `t2i serve --broker` fronts (any number, any machine)",
                       description="Load models and run the jobs that `t2i serve --broker URL` fronts queue for "
                                   "them. A job whose worker dies is run by another after --heartbeat-timeout. "
                                   "SIGTERM or Ctrl-C: running jobs finish, then the worker exits.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--broker", required=True, metavar="URL", help="Redis URL, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--model", action="append", default=None,
                   help="model name or path (repeatable; default: the built-in shapes model)")
    p.add_argument("--max-batch", type=int, default=4, help="images per model call when merging compatible jobs")
    p.add_argument("--batch-wait", type=float, default=0.0,
                   help="seconds to wait for more jobs before starting a batch")
    p.add_argument("--lora-dir", default=None, metavar="DIR", help="A1111's LoRA folder (as t2i serve)")
    p.add_argument("--embedding-dir", default=None, metavar="DIR", help="textual-inversion embeddings (as t2i serve)")
    p.add_argument("--heartbeat-timeout", type=float, default=15.0,
                   help="seconds without a heartbeat before a worker's unfinished jobs go to another worker "
                        "(the same on every worker)")
    p.add_argument("--stop-timeout", type=float, default=600.0,
                   help="seconds SIGTERM waits for the running jobs; those still running then go to another worker")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "int8", "compact"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from t2i.cli import UserError

    try:
        import dramatiq  # noqa: F401 - only to tell the user what to install
    except ModuleNotFoundError:
        raise UserError("t2i worker needs dramatiq and redis: pip install 't2i[distributed]'") from None
    if args.max_batch < 1 or not args.heartbeat_timeout > 0:
        raise UserError("--max-batch must be at least 1 and --heartbeat-timeout positive")
    import torch

    import t2i
    from t2i.adapters.embeddings import load_embedding_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    pipes = [t2i.load(m, precision=args.precision, quantizable=args.lora_dir is None) for m in args.model or [None]]
    if args.embedding_dir:
        for pipe in pipes:
            load_embedding_dir(pipe, args.embedding_dir)
    from t2i.serve.worker import Worker

    worker = Worker(args.broker, pipes, args.max_batch, args.batch_wait, args.lora_dir, args.heartbeat_timeout)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    worker.start()
    print(f"t2i worker {worker.id}: {', '.join(worker.cards)} on {args.broker}", flush=True)
    done.wait()
    worker.stop(args.stop_timeout)
    return 0
