"""Can this host hold a plan's ranks? `moerun` asks before it starts any (no torch needed).

A 64-rank plan of a 31B model started on a laptop does not fail cleanly: the kernel's
out-of-memory killer ends processes across the host. So `moerun` compares, first, the ranks with
the GPUs (one rank each) or the cores, and the plan's predicted memory per rank with the GPU's
or the host's available memory, and refuses with the numbers when they cannot fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from moeplan.runtime.nvml import topology

# Ranks time-slicing one core: the most that the tests and the accuracy bench run (4 ranks on
# 2 cores); the profile's contention is measured at that density, and beyond it ranks crawl.
MAX_RANKS_PER_CORE = 2
# A CPU rank's memory before the model: Python, torch and the gloo group. Measured on this
# project's 2-core host (peak RSS of a gloo rank that imported torch and moeplan.runtime and ran
# one all-reduce: 235 MiB, torch 2.13 CPU build).
RANK_BASE_BYTES = 235 * 2**20


@dataclass(frozen=True)
class Host:
    cores: int
    available_bytes: float  # memory the kernel can still give (MemAvailable)
    gpus: int
    gpu_memory_bytes: float  # the smallest GPU's


def visible(gpus: list[dict]) -> list[dict]:
    """The GPUs a process may use: NVML lists every GPU, CUDA only those CUDA_VISIBLE_DEVICES
    names (indices; any other token - a UUID - is taken as one of them, unknown which), up to
    the first it cannot parse, as CUDA does; unset: all."""
    names = os.environ.get("CUDA_VISIBLE_DEVICES")
    if names is None:
        return gpus
    out = []
    for token in (t.strip() for t in names.split(",")):
        if not token or token.startswith("-"):
            break  # CUDA stops at an empty or negative entry
        if token.isdigit():
            match = [g for g in gpus if g["index"] == int(token)]
            if not match:
                break
            out += match
        elif len(out) < len(gpus):
            out.append(min(gpus, key=lambda g: g["memory_bytes"]))  # a UUID or MIG name
    return out


def this_host() -> Host:
    topo = topology()
    gpus = visible(topo["gpus"]) if topo["available"] else []
    return Host(cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count() or 1,
                available_bytes=_available_memory_bytes(), gpus=len(gpus),
                gpu_memory_bytes=min((g["memory_bytes"] for g in gpus), default=0.0))


def _available_memory_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def refusal(ranks: int, memory_per_rank_bytes: float, host: Host) -> str | None:
    """Why this host cannot hold `ranks` ranks of a plan predicting `memory_per_rank_bytes`
    per rank, or None when it can."""
    if host.gpus:
        if ranks > host.gpus:
            return f"the plan starts {ranks} ranks, one per GPU, and this host has {host.gpus} GPUs"
        if memory_per_rank_bytes > host.gpu_memory_bytes:
            return (f"the plan predicts {_gib(memory_per_rank_bytes)} per rank and this host's "
                    f"GPUs have {_gib(host.gpu_memory_bytes)}")
        return None
    most = MAX_RANKS_PER_CORE * host.cores
    need = ranks * (memory_per_rank_bytes + RANK_BASE_BYTES)
    if ranks > most or need > host.available_bytes:
        return (f"the plan starts {ranks} ranks needing at least {_gib(need)} "
                f"({_gib(memory_per_rank_bytes)} predicted + {_gib(RANK_BASE_BYTES)} per process "
                f"each), and this host has {host.cores} cores (at most {most} ranks) and "
                f"{_gib(host.available_bytes)} available")
    return None
