"""Start N local processes on 127.0.0.1 and collect what each rank saved, failing (not hanging) when
a rank hangs or crashes. Each worker writes ``out_dir/rank{r}.pt`` (a dict; ``"crash"`` holds a
traceback when it failed)."""

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable, nprocs: int, args: tuple, out_dir, timeout_s: float, what: str) -> list[dict]:
    """``worker(rank, *args)`` in ``nprocs`` forkserver processes; their saved results, rank order."""
    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} did not finish within {timeout_s} s (a rank hangs)")
    results = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    return results
