"""Training data: token ids from the user's files, or a byte-level corpus that exists on every
machine (the Python standard library's sources), split and ordered the same under every plan.

Sources (`open_corpus`):
  none                the standard library's sources, bytes (files in sorted order up to 8 MiB)
  a text file         its UTF-8 bytes; a directory: every regular file under it, in sorted path
                      order (links not followed), up to 1 GiB
  with --tokenizer    the same text encoded by a `tokenizers` tokenizer.json
  X.npy               integer token ids, memory-mapped
  X.bin + X.idx       Megatron's indexed dataset (MMIDIDX, version 1), memory-mapped
The last tenth is held out for evaluation. Step s draws the windows of its whole global batch
from a generator seeded by (seed, s); data-parallel rank r and micro-batch m take rows
[r·(global/dp) + m·micro, …) of it, so a step trains on the same sequences under every plan.
"""

from __future__ import annotations

import os
import stat
import struct
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moeplan.spec.errors import ConfigError

DEFAULT_BYTES = 8 << 20
MAX_TEXT_BYTES = 1 << 30
HOLDOUT = 0.1
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"  # Megatron-LM megatron/core/datasets/indexed_dataset.py
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                   8: np.uint16}  # its DType codes; 6 and 7 (floats) hold no token ids


@dataclass(frozen=True)
class Corpus:
    tokens: np.ndarray  # 1-D integer ids (memory-mapped for .npy and .bin)
    source: str  # what the ids are, in words


def stdlib_corpus(max_bytes: int = DEFAULT_BYTES) -> Corpus:
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
    return Corpus(np.frombuffer(blob, dtype=np.uint8), f"the Python standard library's "
                                                          f"sources ({len(blob):,} bytes)")


def _regular(path: Path) -> bool:
    """A regular file, the path itself (a link is not followed); unreadable metadata: no."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _same_device(path: Path, device: int) -> bool:
    """A directory itself (not a link) on the file system `device`."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_dev == device


def _text(path: Path) -> bytes:
    """A file's bytes, or every regular file's under a directory (sorted, links not followed,
    other file systems — /proc, /sys — not entered)."""
    def walk():  # lazily: the budget may be spent long before a large tree is walked
        device = os.stat(path).st_dev
        for root, dirs, names in os.walk(path, followlinks=False):
            dirs[:] = sorted(d for d in dirs if _same_device(Path(root) / d, device))
            yield from (Path(root) / n for n in sorted(names) if _regular(Path(root) / n))

    files = [path] if path.is_file() else walk()
    chunks, total = [], 0
    for f in files:
        try:  # non-blocking: a regular file of a special file system may wait forever
            with os.fdopen(os.open(f, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
                data = fh.read(MAX_TEXT_BYTES - total)
        except OSError as e:
            raise ConfigError(f"--data: cannot read {f}: {e.strerror}") from None
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            if total + len(data) < MAX_TEXT_BYTES or e.start < len(data) - 3:
                raise ConfigError(f"--data: {f} is not UTF-8 text (byte {e.start})") from None
            data = data[:e.start]  # the budget cut a character in two
        chunks.append(data)
        total += len(data)
        if total >= MAX_TEXT_BYTES:
            break
    return b"".join(chunks)


def _megatron(bin_path: Path) -> np.ndarray:
    idx = bin_path.with_suffix(".idx")
    for path in (idx, bin_path):  # a FIFO or device here would block or never end
        if not path.exists():
            raise ConfigError(f"--data {bin_path}: {path} cannot be read: no such file")
        if not path.is_file():
            raise ConfigError(f"--data {bin_path}: {path} is not a regular file")
    try:
        with open(idx, "rb") as f:
            head = f.read(34)
    except OSError as e:
        raise ConfigError(f"--data {bin_path}: its index {idx} cannot be read: "
                          f"{e.strerror}") from None
    if len(head) < 34 or head[:9] != MEGATRON_MAGIC:
        raise ConfigError(f"--data: {idx} is not a Megatron index (MMIDIDX header)")
    version, code, sequences, _documents = struct.unpack("<QBQQ", head[9:34])
    if version != 1 or code not in MEGATRON_DTYPES:
        raise ConfigError(f"--data: {idx}: version {version}, dtype code {code}: expected "
                          f"version 1 with integer ids ({sorted(MEGATRON_DTYPES)})")
    if sequences > idx.stat().st_size // 12:
        raise ConfigError(f"--data: {idx} claims {sequences} sequences, more than it holds")
    lengths = np.fromfile(idx, dtype=np.int32, count=sequences, offset=34)
    dtype = np.dtype(MEGATRON_DTYPES[code])
    count = int(lengths.astype(np.int64).sum())
    if (lengths < 0).any() or count * dtype.itemsize != bin_path.stat().st_size:
        raise ConfigError(f"--data: {bin_path} holds {bin_path.stat().st_size} bytes; its index "
                          f"describes {count} ids of {dtype.itemsize} bytes")
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(count,))


def open_corpus(data: str | None, tokenizer: str | None, vocab_size: int, seq_len: int
                ) -> Corpus:
    """The token ids `moerun --data/--tokenizer` names, checked against the model's vocabulary
    and long enough for a window of `seq_len` + 1 in both splits; a bad file is one line."""
    if data is None:
        if tokenizer is not None:
            raise ConfigError("--tokenizer needs --data (the text it encodes)")
        corpus = stdlib_corpus()
    else:
        if not data.strip():
            raise ConfigError("--data is empty")
        path = Path(data)
        if not path.exists():
            raise ConfigError(f"--data {data}: no such file or directory")
        suffix = path.suffix.lower() if path.is_file() else ""
        if suffix in (".npy", ".bin", ".idx") and tokenizer is not None:
            raise ConfigError(f"--data {data} holds token ids already; --tokenizer encodes text")
        if suffix == ".npy":
            try:
                ids = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise ConfigError(f"--data {data} is not a .npy array: {e}") from None
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise ConfigError(f"--data {data}: a 1-D array of integer token ids expected, "
                                  f"got {ids.dtype} of shape {ids.shape}")
            corpus = Corpus(ids, f"{path.name}: {len(ids):,} token ids")
        elif suffix in (".bin", ".idx"):
            ids = _megatron(path.with_suffix(".bin"))
            corpus = Corpus(ids, f"{path.stem} (Megatron .bin/.idx): {len(ids):,} token ids")
        else:
            text = _text(path)
            if tokenizer is None:
                corpus = Corpus(np.frombuffer(text, dtype=np.uint8),
                                f"{path.name}: {len(text):,} bytes of text")
            else:
                corpus = Corpus(_encode(text, tokenizer), f"{path.name} encoded by {tokenizer}")
    n = len(corpus.tokens)
    need = int((seq_len + 2) / HOLDOUT) + 1
    if n < need:
        raise ConfigError(f"--data: {n:,} tokens; windows of {seq_len + 1} in a held-out tenth "
                          f"need at least {need:,}")
    top = int(corpus.tokens.max()) if n else 0
    low = int(corpus.tokens.min()) if n else 0
    if low < 0 or top >= vocab_size:
        raise ConfigError(f"--data: token ids run from {low} to {top}; the model's vocabulary "
                          f"has {vocab_size} (0-{vocab_size - 1})")
    return corpus


def _encode(text: bytes, tokenizer: str) -> np.ndarray:
    try:
        from tokenizers import Tokenizer  # optional: pip install tokenizers
    except ImportError:
        raise ConfigError("--tokenizer needs the `tokenizers` package (pip install "
                          "tokenizers)") from None
    if not Path(tokenizer).is_file():
        raise ConfigError(f"--tokenizer {tokenizer}: no such file")
    try:
        tok = Tokenizer.from_file(tokenizer)
    except Exception as e:  # the library raises its own exception types
        raise ConfigError(f"--tokenizer {tokenizer} is not a tokenizer.json: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return np.asarray(tok.encode(text.decode("utf-8")).ids, dtype=np.int64)


class Batches:
    def __init__(self, corpus: Corpus, seq_len: int, seed: int = 0, holdout: float = HOLDOUT):
        cut = int(len(corpus.tokens) * (1 - holdout))
        self.train, self.eval = corpus.tokens[:cut], corpus.tokens[cut:]
        self.seq_len, self.seed = seq_len, seed

    def _windows(self, data: np.ndarray, starts: torch.Tensor) -> torch.Tensor:
        rows = starts.numpy()[:, None] + np.arange(self.seq_len + 1)
        return torch.from_numpy(np.asarray(data[rows], dtype=np.int64))  # [n, S + 1]

    def _starts(self, data: np.ndarray, n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(data) - self.seq_len - 1, (n,), generator=g)

    def batch(self, step: int, first: int, n: int, global_batch: int) -> torch.Tensor:
        """Rows [first, first + n) of step `step`'s global batch: inputs and shifted targets."""
        g = torch.Generator().manual_seed(hash((self.seed, step)) & (2**62 - 1))
        return self._windows(self.train, self._starts(self.train, global_batch, g)[first:first + n])

    def eval_batch(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 12345)
        return self._windows(self.eval, self._starts(self.eval, n, g))

    def prompts(self, n: int, length: int, dp_rank: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000 + dp_rank)
        starts = torch.randint(0, len(self.eval) - length, (n,), generator=g)
        rows = starts.numpy()[:, None] + np.arange(length)
        return torch.from_numpy(np.asarray(self.eval[rows], dtype=np.int64))
