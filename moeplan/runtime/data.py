"""A byte-level text corpus that exists on every machine: the Python standard library's sources.

Files are taken in sorted order up to a byte budget, so every rank (and every machine with the
same Python) reads the same corpus; the last tenth is held out for evaluation. Batches are random
windows drawn from a generator seeded by (seed, step, data-parallel rank): ranks of one tensor-
slicing group draw the same batch, different data-parallel ranks different ones.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

DEFAULT_BYTES = 8 << 20


def stdlib_corpus(max_bytes: int = DEFAULT_BYTES) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total < 1 << 16:
        raise RuntimeError(f"found only {total} bytes of Python sources under {root}")
    blob = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()


class Batches:
    def __init__(self, corpus: torch.Tensor, seq_len: int, seed: int = 0, holdout: float = 0.1):
        cut = int(len(corpus) * (1 - holdout))
        self.train, self.eval = corpus[:cut], corpus[cut:]
        self.seq_len, self.seed = seq_len, seed

    def _windows(self, data: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(data) - self.seq_len - 1, (n,), generator=g)
        offsets = torch.arange(self.seq_len + 1)
        return data[starts[:, None] + offsets]  # [n, S + 1]: inputs and shifted targets

    def batch(self, step: int, micro: int, dp_rank: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((self.seed, step, micro, dp_rank)) & (2**62 - 1))
        return self._windows(self.train, n, g)

    def eval_batch(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 12345)
        return self._windows(self.eval, n, g)

    def prompts(self, n: int, length: int, dp_rank: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000 + dp_rank)
        starts = torch.randint(0, len(self.eval) - length, (n,), generator=g)
        return self.eval[starts[:, None] + torch.arange(length)]
