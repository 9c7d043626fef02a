"""moerun's data: text (a file or a directory), .npy ids, Megatron .bin/.idx, read as written;
every bad file one line; a step's sequences the same under every data-parallel degree."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from moeplan.runtime.data import MEGATRON_MAGIC, Batches, open_corpus
from moeplan.spec.errors import ConfigError

SEQ = 16
ENOUGH = 400  # tokens: windows of SEQ + 1 fit in the held-out tenth


def _megatron(prefix, docs: list[list[int]], dtype=np.uint16, code: int = 8):
    ids = np.concatenate([np.asarray(d, dtype=dtype) for d in docs])
    (prefix.with_suffix(".bin")).write_bytes(ids.tobytes())
    lengths = np.asarray([len(d) for d in docs], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1]) * np.dtype(dtype).itemsize])
    with open(prefix.with_suffix(".idx"), "wb") as f:
        f.write(MEGATRON_MAGIC + struct.pack("<QBQQ", 1, code, len(docs), len(docs) + 1))
        f.write(lengths.tobytes() + pointers.astype(np.int64).tobytes()
                + np.arange(len(docs) + 1, dtype=np.int64).tobytes())
    return ids


def test_text_file_and_directory_are_their_bytes(tmp_path):
    text = ("héllo wörld " * 40).encode()
    (tmp_path / "a.txt").write_bytes(text)
    c = open_corpus(str(tmp_path / "a.txt"), None, 256, SEQ)
    assert bytes(c.tokens.astype(np.uint8)) == text
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_bytes(b"B" * 300)
    (d / "sub" / "c.txt").write_bytes(b"C" * 300)
    (d / "a-link.txt").symlink_to(tmp_path / "a.txt")  # a link is not followed
    c = open_corpus(str(d), None, 256, SEQ)
    assert bytes(c.tokens.astype(np.uint8)) == b"B" * 300 + b"C" * 300


def test_npy_and_megatron_ids_are_read_as_written(tmp_path):
    ids = np.arange(ENOUGH, dtype=np.int32) % 1000
    np.save(tmp_path / "ids.npy", ids)
    assert (open_corpus(str(tmp_path / "ids.npy"), None, 1000, SEQ).tokens == ids).all()
    docs = [list(range(i, i + 150)) for i in (0, 200, 400)]
    written = _megatron(tmp_path / "corpus", docs)
    for name in ("corpus.bin", "corpus.idx"):
        got = open_corpus(str(tmp_path / name), None, 1000, SEQ).tokens
        assert (np.asarray(got) == written).all()


def _bytes(content: bytes):
    def make(p):
        p.write_bytes(content)
        return p
    return make


def _npy(array):
    def make(p):
        np.save(p.with_suffix(".npy"), array)
        return p.with_suffix(".npy")
    return make


@pytest.mark.parametrize("make, message", [
    (_bytes(b"\xff\xfe" * 300), "not UTF-8"),
    (_bytes(b"short"), "need at least"),
    (_npy(np.zeros((20, 20), np.int64)), "1-D array"),
    (_npy(np.full(ENOUGH, 5000)), "vocabulary"),
    (_npy(np.ones(ENOUGH)), "integer"),
    (lambda p: _bytes(b"not numpy")(p.with_suffix(".npy")), "not a .npy"),
])
def test_bad_data_is_one_line(tmp_path, make, message):
    path = make(tmp_path / "data.txt")
    with pytest.raises(ConfigError, match=message) as e:
        open_corpus(str(path), None, 1000, SEQ)
    assert "\n" not in str(e.value)


def test_bad_megatron_files_are_one_line(tmp_path):
    docs = [list(range(300))]
    _megatron(tmp_path / "x", docs)
    (tmp_path / "x.bin").write_bytes((tmp_path / "x.bin").read_bytes()[:-2])
    with pytest.raises(ConfigError, match="describes"):
        open_corpus(str(tmp_path / "x.bin"), None, 1000, SEQ)
    _megatron(tmp_path / "y", docs, dtype=np.float32, code=7)
    with pytest.raises(ConfigError, match="integer ids"):
        open_corpus(str(tmp_path / "y.bin"), None, 1000, SEQ)
    (tmp_path / "z.bin").write_bytes(b"\0" * 600)
    (tmp_path / "z.idx").write_bytes(b"NOTMEGATRON" * 4)
    with pytest.raises(ConfigError, match="not a Megatron index"):
        open_corpus(str(tmp_path / "z.bin"), None, 1000, SEQ)
    (tmp_path / "w.bin").write_bytes(b"\0" * 600)
    with pytest.raises(ConfigError, match="cannot be read"):
        open_corpus(str(tmp_path / "w.bin"), None, 1000, SEQ)
    os.mkfifo(tmp_path / "w.idx")  # opening it would wait for a writer forever (audit)
    with pytest.raises(ConfigError, match="w.idx is not a regular file"):
        open_corpus(str(tmp_path / "w.bin"), None, 1000, SEQ)


@pytest.mark.parametrize("dp", [2, 4])
def test_a_step_trains_on_the_same_sequences_under_every_data_parallel_degree(dp):
    data = Batches(open_corpus(None, None, 256, SEQ), SEQ, seed=3)
    global_batch, micro = 8, 2

    def step(dp: int) -> list:
        rows = []
        steps = global_batch // (dp * micro)
        for r in range(dp):
            for m in range(steps):
                rows += data.batch(7, (r * steps + m) * micro, micro, global_batch).tolist()
        return rows

    assert step(dp) == step(1)
    assert step(1) != Batches(open_corpus(None, None, 256, SEQ), SEQ, seed=3).batch(
        8, 0, global_batch, global_batch).tolist()


def test_moerun_refuses_bad_data_before_any_rank_starts(tmp_path):
    plan = tmp_path / "plan.json"
    subprocess.run([sys.executable, "-c", "from moeplan.cli.main import main; main()", "search",
                    "--model", "tiny-pr-moe", "--cluster", "local-cpu", "--gpus", "1",
                    "--global-batch", "2", "--seq-len", "16", "--simulate-top", "0", "--out",
                    str(plan)], check=True, capture_output=True)
    (tmp_path / "bad.txt").write_bytes(b"\xff" * 1000)
    r = subprocess.run([sys.executable, "-c", "from moeplan.cli.moerun import main; main()",
                        "--plan", str(plan), "--data", str(tmp_path / "bad.txt")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not UTF-8" in r.stderr and not (tmp_path / "run.json").exists()
    (tmp_path / "good.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    r = subprocess.run([sys.executable, "-c", "from moeplan.cli.moerun import main; main()",
                        "--plan", str(plan), "--data", str(tmp_path / "good.txt"), "--steps",
                        "2", "--warmup", "0"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "good.txt: 1,800 bytes of text" in r.stderr
    run = json.loads((tmp_path / "run.json").read_text())
    assert len(run["losses"]) == 2 and all(x is not None for x in run["losses"])


def test_a_tokenizer_encodes_the_text(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "the": 1, "quick": 2, "fox": 3}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "t.txt").write_text("the quick fox jumps " * 200)
    c = open_corpus(str(tmp_path / "t.txt"), str(tmp_path / "tokenizer.json"), 8, SEQ)
    assert c.tokens[:8].tolist() == [1, 2, 3, 0, 1, 2, 3, 0] and len(c.tokens) == 800
    with pytest.raises(ConfigError, match="vocabulary"):  # ids past a 2-symbol vocabulary
        open_corpus(str(tmp_path / "t.txt"), str(tmp_path / "tokenizer.json"), 2, SEQ)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a tokenizer.json"):
        open_corpus(str(tmp_path / "t.txt"), str(tmp_path / "bad.json"), 8, SEQ)
    with pytest.raises(ConfigError, match="needs --data"):
        open_corpus(None, str(tmp_path / "tokenizer.json"), 8, SEQ)
