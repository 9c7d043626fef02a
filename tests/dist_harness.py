"""Run a function on N CPU ranks (gloo) once, and hand back what each rank returned.

One world per test module: each process pays seconds to import torch, so a module spawns its world
once and runs all its cases in it; the tests then assert on the returned objects.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world: int, target: str, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    module, func = target.split(":")
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world)
        result = getattr(importlib.import_module(module), func)(rank, world)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # the traceback goes back to the test as its result
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_world(target: str, world: int, timeout_s: float = 240) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(_worker, args=(world, target, store, tmp), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        # join() returns False while some ranks are still running; it raises if one failed
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.01)):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{target} on {world} ranks did not finish in {timeout_s} s")
        results = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False)
                   for r in range(world)]
    for r, res in enumerate(results):
        if "error" in res:
            raise RuntimeError(f"rank {r} failed:\n{res['error']}")
    return results
