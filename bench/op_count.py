"""Counting what a piece of PyTorch code would launch on a GPU, by running it on the CPU: the
counting mode the DeepSpeed count benches share (and their small helpers).

Every aten operation counts as one kernel launch, except views (`_unsafe_view` too), allocations
without a fill and a copy_ onto the very same data (ATen returns before any kernel); its bytes
are those of its tensor inputs and outputs (a broadcast input's distinct elements; an output it
only writes — copy_, zero_, fill_ — is not read; a gather reads the rows it selects, a scatter
writes what its index addresses and reads nothing else of its destination), GEMMs' kept apart
(`mm`, `addmm`, `bmm`, `baddbmm` of inner dimension above 1, their FLOPs counted too: one of
inner dimension 1 is an outer product, memory-bound like the rest); `_local_scalar_dense` is a
host read; collectives (c10d) are listed, not counted, and the profiler's record_function marks
are left out. Counts go to the mode's current `phase` (a
string the caller moves).

Host tensors: on a GPU, what the code makes with `torch.tensor(...)` (a scalar such as
DeepSpeed's capacity factor) stays on the CPU, and so does whatever is computed from host tensors
alone. The mode follows them: an operation whose tensor inputs are all host tensors is a host
operation (listed apart, launching nothing on a GPU), and reading one back is a host read, not a
device sync. Factories without tensor inputs count as device operations (the code under count
places them on the device).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import weakref
from collections import Counter, defaultdict


def free_port() -> int:
    """A free TCP port on loopback, for a local process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> None:
    """The environment torch.distributed / DeepSpeed read for one rank of a loopback world."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))


def run_world(target, world: int, timeout_s: float = 900):
    """Run `target(rank, world, port, queue)` in `world` spawned processes over loopback and
    return what rank 0 puts on the queue."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    got = queue.get(timeout=timeout_s)
    for proc in procs:
        proc.join(timeout=120)
    return got


def start_deepspeed(bench: str):
    """(deepspeed, torch) in a one-rank loopback gloo world on the CPU accelerator, one thread;
    None, with why on stderr, where DeepSpeed cannot be imported."""
    rank_env(0, 1, free_port())
    try:
        import deepspeed
        import torch
    except ImportError as e:
        print(f"{bench}: needs deepspeed (pip install deepspeed==0.16.4): {e}", file=sys.stderr)
        return None
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    return deepspeed, torch


def save_json(record: dict, path: str | None) -> None:
    """Write a bench's record as sorted, indented JSON (nothing without a path)."""
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.write("\n")


def counter():
    """The counting mode's class (torch is imported here, so that callers can set up the
    environment first)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    aten = torch.ops.aten
    free = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
            aten.new_empty.default, aten.new_empty_strided.default, aten.detach.default,
            aten.lift_fresh.default, aten.set_.source_Storage_storage_offset,
            aten.set_.source_Tensor, aten.resize_.default, aten._unsafe_view.default}
    write_only = {"copy_", "zero_", "fill_"}
    gathers = {"index_select", "gather", "index", "embedding"}
    scatters = {"scatter_", "scatter_add_", "index_put_", "index_add_", "index_copy_"}

    def nbytes(t) -> int:
        """Distinct elements' bytes: a broadcast (stride-0) dimension is read once."""
        n = 1
        for size, stride in zip(t.shape, t.stride()):
            n *= size if stride else 1
        return n * t.element_size()

    def moved_bytes(name: str, ins, outs) -> int:
        """Bytes an operation reads and writes: its inputs and outputs, except that a gather
        reads only the rows it selects (its output's size) besides its index, and a scatter
        into a tensor reads its index and source and writes (an add: reads too) only the
        elements they address."""
        if name in gathers and outs:
            return 2 * sum(map(nbytes, outs)) + sum(map(nbytes, ins[1:]))
        if name in scatters and ins:
            rest = ins[1:]
            n = max((t.numel() for t in rest), default=0) * ins[0].element_size()
            return sum(map(nbytes, rest)) + n * (2 if "add" in name else 1)
        return sum(map(nbytes, ins + outs))

    gemms = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}

    def gemm_flops(func, args) -> int:
        """2·M·N·K of a GEMM (summed over a batch), 0 for anything else or K = 1."""
        if func not in gemms:
            return 0
        a, b = (args[1], args[2]) if func in (aten.addmm.default, aten.baddbmm.default) else (
            args[0], args[1])
        k = a.shape[-1]
        return 2 * a.numel() * b.shape[-1] if k > 1 else 0

    def same_data(func, args) -> bool:
        if func is not aten.copy_.default:
            return False
        dst, src = args[0], args[1]
        return (dst.data_ptr() == src.data_ptr() and dst.dtype == src.dtype
                and dst.shape == src.shape and dst.stride() == src.stride())

    class Count(TorchDispatchMode):
        def __init__(self, phase: str = "all"):
            super().__init__()
            self.on, self.phase = True, phase
            self.launches: Counter = Counter()
            self.bytes: Counter = Counter()
            self.gemm_bytes: Counter = Counter()  # the part of `bytes` GEMMs move
            self.flops: Counter = Counter()  # GEMM FLOPs
            self.syncs: Counter = Counter()
            self.collectives: dict[str, Counter] = defaultdict(Counter)
            self.ops: dict[str, Counter] = defaultdict(Counter)
            self.host_ops: dict[str, Counter] = defaultdict(Counter)
            self.host_reads: Counter = Counter()
            self._host: dict[int, weakref.ref] = {}  # id -> the host tensor (alive)

        def _is_host(self, t) -> bool:
            ref = self._host.get(id(t))
            return ref is not None and ref() is t

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            host = (func is aten.lift_fresh.default
                    or (bool(ins) and all(self._is_host(t) for t in ins)))
            if host:
                for t in outs:
                    self._host[id(t)] = weakref.ref(t)
            if not self.on:
                return out
            name = func.overloadpacket.__name__
            if func.namespace == "profiler":  # record_function marks: no kernel
                return out
            if func.namespace == "c10d" or name.startswith("_c10d"):
                self.collectives[self.phase][name] += 1
                return out
            if func is aten._local_scalar_dense.default:
                (self.host_reads if host else self.syncs)[self.phase] += 1
                return out
            if func.is_view or func in free or same_data(func, args):
                return out
            if host:
                self.host_ops[self.phase][name] += 1
                return out
            if name in write_only and ins:
                ins = ins[1:]  # the destination is written, not read
            self.launches[self.phase] += 1
            self.ops[self.phase][name] += 1
            moved = moved_bytes(name, ins, outs)
            self.bytes[self.phase] += moved
            flops = gemm_flops(func, args)
            if flops:
                self.flops[self.phase] += flops
                self.gemm_bytes[self.phase] += moved
            return out

    return Count
