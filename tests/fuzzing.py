"""Hostile input for every loader and option: the strategies and the one check they all share.

Used by tests/test_fuzz.py (a few examples per target, in `.ci/run`), tests/test_fuzz_fs.py
(`outcome`) and bench/fuzz.py (many).
A target is a CLI entry point called in this process with a file or option drawn by hypothesis;
the promise: exit code 0, or 2 with exactly one line on stderr, within a time bound, and nothing
but the named output written. `outcome` sorts what happened into clean / traceback / hang.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from moeplan.spec import load_cluster, load_model

LIMIT_S = 20.0  # one call: a bound far above any clean answer here (< 2 s), far below a hang


class Hang(Exception):
    pass


@dataclass
class Outcome:
    rc: int | None
    err: str
    seconds: float
    kind: str  # clean | traceback | hang
    why: str = ""


def _alarm(_signum, _frame):
    raise Hang()


def outcome(main, argv: list[str], cwd: Path, limit_s: float = LIMIT_S,
            one_line_rcs: tuple[int, ...] = (2,)) -> Outcome:
    """Run `main()` (a CLI entry point) with `argv` in `cwd`, bounded by `limit_s` (SIGALRM).
    Clean: rc 0, or an rc of `one_line_rcs` with exactly one stderr line."""
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["prog", *argv]
    os.chdir(cwd)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    t0 = time.perf_counter()
    rc, why = None, ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Hang:
        return Outcome(None, err.getvalue(), time.perf_counter() - t0, "hang", "over the limit")
    except BaseException as e:  # escaped the CLI's error handling: a traceback for the user
        why = f"{type(e).__name__}: {e}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        sys.argv = old_argv
        os.chdir(old_cwd)
    seconds = time.perf_counter() - t0
    text = err.getvalue()
    lines = [line for line in text.splitlines() if line.strip()]
    if why:
        return Outcome(None, text, seconds, "traceback", why)
    if rc == 0 or (rc in one_line_rcs and len(lines) == 1):
        return Outcome(rc, text, seconds, "clean")
    return Outcome(rc, text, seconds, "traceback",
                   f"rc {rc} with {len(lines)} stderr lines: {text[-300:]!r}")


# ---- hostile values and documents ----

HOSTILE_NUMBERS = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 2**31, 2**63, 10**30, -(2**63), 0.0, -0.0, 0.5, 1e-300,
                     1e308, math.inf, -math.inf, math.nan]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True))
HOSTILE_VALUES = st.one_of(
    HOSTILE_NUMBERS, st.none(), st.booleans(), st.text(max_size=12),
    st.lists(st.one_of(st.integers(min_value=-3, max_value=2**33), st.text(max_size=3)),
             max_size=6),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3))


def _paths(doc, prefix=()) -> list[tuple]:
    """Every key path of a JSON document (lists by index, at most 8 items deep)."""
    out = []
    items = (doc.items() if isinstance(doc, dict)
             else enumerate(doc[:8]) if isinstance(doc, list) else [])
    for k, v in items:
        out.append(prefix + (k,))
        out += _paths(v, prefix + (k,))
    return out


def _set(doc, path: tuple, value, delete: bool):
    node = doc
    for k in path[:-1]:
        node = node[k]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value


# names a document may give to things the program then names files after, and keys
HOSTILE_NAMES = st.one_of(
    st.sampled_from(["", " ", ".", "..", "/", "../../x", "../x", "a/b", "/etc/x", "..\\x", "-",
                     "plans", "a\nb", "\x00", "x" * 300, "tiny-pr-moe", "local-cpu"]),
    st.text(max_size=10))
DEEP = "\x00deep\x00"  # a value `mutated` writes as an object nested 800 levels deep
DEEP_JSON = '{"a": ' * 800 + "1" + "}" * 800  # spliced in as text: no recursion to build it
HF_NUMBERS = st.one_of(  # for a Hugging Face config's known integer keys: heads, sizes, counts
    st.sampled_from([0, -1, -4, 10**200, -(10**200), 2**1000, 10**300 + 7, 10**400]),
    st.integers(min_value=10**150, max_value=10**400), st.integers(min_value=-64, max_value=0))


def _parent_of_key(doc, path: tuple) -> dict | None:
    node = doc
    for k in path[:-1]:
        node = node[k]
    return node if isinstance(node, dict) else None


@st.composite
def mutated(draw, base: dict, max_changes: int = 3, keys: bool = False,
            values: st.SearchStrategy = HOSTILE_VALUES) -> str:
    """`base` with 1..max_changes keys set to `values`, deleted or added (JSON text, with NaN and
    Infinity written as Python's json writes them); with `keys`, also keys renamed to hostile
    names and values nested 800 deep."""
    doc = json.loads(json.dumps(base))
    values = st.one_of(values, st.just(DEEP)) if keys else values
    for _ in range(draw(st.integers(min_value=1, max_value=max_changes))):
        paths = _paths(doc)
        ops = ["set", "set", "set", "delete", "add"] + (["rename", "rename"] if keys else [])
        what = draw(st.sampled_from(ops))
        if what == "add" or not paths:
            key = draw(HOSTILE_NAMES if keys else st.text(min_size=1, max_size=8))
            doc[key] = draw(values)
        elif what == "rename":
            path = draw(st.sampled_from(paths))
            parent = _parent_of_key(doc, path)
            if parent is not None:
                parent[draw(HOSTILE_NAMES)] = parent.pop(path[-1])
        else:
            path = draw(st.sampled_from(paths))
            _set(doc, path, draw(values), delete=what == "delete")
    return json.dumps(doc).replace(json.dumps(DEEP), DEEP_JSON)


def rename(doc, old: str, new: str):
    """`doc` with every key and string value equal to `old` replaced by `new`."""
    if isinstance(doc, dict):
        return {(new if k == old else k): rename(v, old, new) for k, v in doc.items()}
    if isinstance(doc, list):
        return [rename(v, old, new) for v in doc]
    return new if doc == old else doc


@st.composite
def renamed(draw, base: dict, old: str) -> str:
    """`base` with the name `old` replaced everywhere, as key and as value, by a hostile name: a
    document that agrees with itself, so the name reaches whatever is named after it (files)."""
    return json.dumps(rename(base, old, draw(HOSTILE_NAMES)))


@st.composite
def hf_numbers(draw, base: dict) -> str:
    """A Hugging Face config with 1-3 of its integer keys set to counts with hundreds of digits,
    zero or negative (head counts among them)."""
    doc = dict(base)
    ints = sorted(k for k, v in doc.items() if type(v) is int)
    for key in draw(st.lists(st.sampled_from(ints), min_size=1, max_size=3, unique=True)):
        doc[key] = draw(HF_NUMBERS)
    return json.dumps(doc)


def raw_bytes() -> st.SearchStrategy[bytes]:
    """Files that are not documents: arbitrary bytes, truncated or deeply nested JSON."""
    return st.one_of(st.binary(max_size=200),
                     st.integers(min_value=1, max_value=20000).map(
                         lambda n: b"[" * n + b"]" * n),
                     st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")))


def model_base() -> dict:
    return json.loads(load_model("tiny-pr-moe").model_dump_json())


def hf_bases() -> list[dict]:
    """Small Hugging Face configs of each architecture family moeplan reads."""
    from hf_configs import DEEPSEEK_V2_LITE, MIXTRAL_8X7B, QWEN15_MOE_A27B

    small = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 256, "max_position_embeddings": 128}
    return [dict(MIXTRAL_8X7B, **small, intermediate_size=128, num_local_experts=4),
            dict(QWEN15_MOE_A27B, **small, moe_intermediate_size=32, num_experts=4,
                 shared_expert_intermediate_size=64),
            dict(DEEPSEEK_V2_LITE, **small, moe_intermediate_size=32, n_routed_experts=4,
                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                 num_experts_per_tok=2)]


def cluster_base() -> dict:
    return json.loads(load_cluster("local-cpu").model_dump_json())


# what `moeplan search` takes besides files: (option, values drawn for it)
SEARCH_OPTIONS = {
    "--gpus": st.one_of(st.integers(min_value=-4, max_value=2**40), st.text(max_size=6)),
    "--global-batch": st.one_of(st.integers(min_value=-2, max_value=2**64), st.text(max_size=6)),
    "--micro-batch": st.integers(min_value=-2, max_value=2**40),
    "--seq-len": st.integers(min_value=-2, max_value=2**40),
    "--prompt-len": st.integers(min_value=-2, max_value=2**40),
    "--gen-len": st.integers(min_value=-2, max_value=2**40),
    "--routing-skew": st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                st.text(max_size=6)),
    "--slo-ms": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)),
    "--simulate-top": st.integers(min_value=-2, max_value=2**40),
    "--mode": st.sampled_from(["train", "infer", "", "x"]),
    "--runtime": st.sampled_from(["moerun", "deepspeed", "deepspeed-sparse", "DeepSpeed"]),
    "--zero": st.sampled_from(["0", "1", "2", "3", "-1"]),
    "--fix": st.one_of(
        st.tuples(st.sampled_from(["tp", "ep", "es", "edp", "a2a", "tp-coordinated",
                                   "micro-batch", "recompute", "x", ""]),
                  st.one_of(st.integers(min_value=-3, max_value=2**40).map(str),
                            st.sampled_from(["flat", "hierarchical", "true", "false", "nan",
                                             ""]))).map(lambda kv: f"{kv[0]}={kv[1]}"),
        st.text(max_size=10)),
    "--out": st.sampled_from(["", ".", "/", "sub/none/p.json", "p.json", "-"]),
}


def _hostile(draw, argv: list[str], options: dict, most: int) -> list[str]:
    """`argv` with 1..`most` of `options` appended, each with a value drawn for it (a flag's
    strategy is None)."""
    names = draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=most,
                          unique=True))
    for name in names:
        argv += [name] if options[name] is None else [name, str(draw(options[name]))]
    return argv


@st.composite
def search_options(draw) -> list[str]:
    """A `moeplan search` command line for tiny-pr-moe with 1-4 options drawn hostile."""
    argv = ["search", "--model", "tiny-pr-moe", "--cluster", "local-cpu", "--gpus", "4",
            "--global-batch", "8", "--seq-len", "32", "--simulate-top", "2", "--json"]
    return _hostile(draw, argv, SEARCH_OPTIONS, 4)


# what `moeplan sweep` takes besides what it shares with search: (option, values drawn for it)
SWEEP_OPTIONS = {
    "--gpus": st.one_of(st.sampled_from(["2-4", "1-2", "4-2", "2,4", "3", "0", "", "-", "2-",
                                         ",", "2,,4", "99999999", "1-99999999"]),
                        st.text(max_size=8)),
    "--mode": st.sampled_from(["train", "infer", "both", "", "x"]),
    "--per-gpu-batch": st.one_of(st.sampled_from(["1", "1,2", "0", "-1", "1,,2", "", "65537"]),
                                 st.text(max_size=6)),
    "--price-per-gpu-hour": st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                      st.text(max_size=6)),
    "--train-tokens": st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                st.text(max_size=6)),
    "--days": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)),
    "--target-tokens-per-s": st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                       st.text(max_size=6)),
    "--slo-ms": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)),
    "--global-batch": st.integers(min_value=-2, max_value=2**64),
    "--fix": SEARCH_OPTIONS["--fix"],
    "--model": st.sampled_from(["tiny-pr-moe", "nope", "", "plan.json"]),
    "--cluster": st.sampled_from(["local-cpu", "nope", ""]),
    "--out": st.sampled_from(["", ".", "/", "sub/none/s.csv", "s.csv", "s.json", "s.txt"]),
}


@st.composite
def sweep_options(draw) -> list[str]:
    """A `moeplan sweep` command line for tiny-pr-moe on 2-4 CPU ranks, 1-4 options hostile."""
    argv = ["sweep", "--model", "tiny-pr-moe", "--cluster", "local-cpu", "--gpus", "2-4",
            "--global-batch", "8", "--seq-len", "32", "--simulate-top", "2", "--jobs", "1",
            "--out", "sweep.out.csv"]
    return _hostile(draw, argv, SWEEP_OPTIONS, 4)


# what `moerun` takes: (option, values drawn for it); the command ends at --print-torchrun, after
# every check (plan, teacher, data, checkpoints, outputs) and before any rank starts
MOERUN_OPTIONS = {
    "--plan": st.sampled_from(["plan.json", "mos.json", "", "nope.json", "ckpt"]),
    "--mode": st.sampled_from(["train", "infer", "", "x"]),
    "--steps": st.one_of(st.integers(min_value=-2, max_value=2**64), st.text(max_size=6)),
    "--warmup": st.integers(min_value=-2, max_value=2**64),
    "--lr": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)),
    "--seed": st.integers(min_value=-2, max_value=2**70),
    "--teacher": st.sampled_from(["ckpt", "", ".", "/", "nope", "plan.json", "mos.json"]),
    "--kd-steps": st.one_of(st.integers(min_value=-2, max_value=2**64), st.text(max_size=6)),
    "--schedule-steps": st.integers(min_value=-2, max_value=2**64),
    "--load": st.sampled_from(["ckpt", "", ".", "nope", "plan.json"]),
    "--timeout": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)),
    "--nproc": st.integers(min_value=-2, max_value=2**40),
}


@st.composite
def moerun_options(draw) -> list[str]:
    """A `moerun` command line for the tiny plans (plain and Mixture-of-Students), 1-4 options
    drawn hostile."""
    argv = ["--plan", "mos.json", "--print-torchrun"]
    return _hostile(draw, argv, MOERUN_OPTIONS, 4)


EXPORT_OPTIONS = {
    "--to": st.sampled_from(["deepspeed", "megatron-deepspeed", "megatron-core", "", "x"]),
    "--out": st.sampled_from(["", ".", "/", "export.out", "plan.json", "sub/none/x", "ckpt"]),
    "--profile": st.sampled_from(["", "nope", "plan.json", "run.json", "/"]),
    "--runtime": st.sampled_from(["deepspeed", "deepspeed-sparse", "moerun", "", "DeepSpeed"]),
}


@st.composite
def export_options(draw) -> list[str]:
    """A `moeplan export` command line for the tiny plans, 1-3 options drawn hostile."""
    argv = ["export", draw(st.sampled_from(["plan.json", "mos.json"])), "--to", "deepspeed",
            "--out", "export.out"]
    return _hostile(draw, argv, EXPORT_OPTIONS, 3)


# paths that are not the file an option wants; `hostile_files` makes them in the work folder
HOSTILE_PATHS = ["", ".", "/", "nope.json", "sub/none/x.json", "hostile", "hostile/dir",
                 "hostile/fifo", "hostile/link-dir", "hostile/dangling"]


def hostile_files(work: Path) -> None:
    """work/hostile: an empty directory, a FIFO, a link to the directory, a dangling link, and
    Megatron .bin files whose .idx is a FIFO or garbage (the folder itself: a directory holding
    a FIFO)."""
    h = work / "hostile"
    if h.exists():
        return
    h.mkdir()
    (h / "dir").mkdir()
    os.mkfifo(h / "fifo")
    (h / "link-dir").symlink_to("dir")
    (h / "dangling").symlink_to("nowhere")
    (h / "fifo-idx.bin").write_bytes(bytes(range(200)) * 4)
    os.mkfifo(h / "fifo-idx.idx")
    (h / "garbage-idx.bin").write_bytes(bytes(range(200)) * 4)
    (h / "garbage-idx.idx").write_bytes(b"MMIDIDX\x00\x00" + bytes(range(256)) * 2)


def _paths_or(*good: str) -> st.SearchStrategy[str]:
    return st.sampled_from([*good, *HOSTILE_PATHS])


def _names_or(*good: str) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from([*good, "", "x", " "]), st.text(max_size=8))


# `moeplan search`'s names and the files it reads, drawn as paths
SEARCH_NAMES = {
    "--objective": _names_or("throughput", "latency", "Throughput"),
    "--dtype": _names_or("bf16", "fp16", "fp32", "int8", "BF16"),
    "--model": st.one_of(_paths_or("tiny-pr-moe", "plan.json"), HOSTILE_NAMES),
}


@st.composite
def search_names(draw) -> list[str]:
    """A `moeplan search` command line with --cluster, --profile or both drawn (names, paths),
    or local-cpu, and 0-3 of --objective, --dtype, --model."""
    argv = ["search", "--model", "tiny-pr-moe", "--gpus", "4", "--global-batch", "8",
            "--seq-len", "32", "--simulate-top", "2", "--json", "--out", "plan.out.json"]
    which = draw(st.sampled_from(["good", "good", "cluster", "profile", "profile", "both"]))
    if which == "good":  # so that the other options are reached
        argv += ["--cluster", "local-cpu"]
    if which in ("cluster", "both"):
        argv += ["--cluster", draw(st.one_of(_names_or("local-cpu", "nope", "local-cpu/"),
                                             HOSTILE_NAMES))]
    if which in ("profile", "both"):
        argv += ["--profile", draw(_paths_or("plan.json", "run.json"))]
    if which == "good" or draw(st.booleans()):
        argv = _hostile(draw, argv, SEARCH_NAMES, 3)
    return argv


COUNTS = st.one_of(st.integers(min_value=-2, max_value=2**40), st.text(max_size=6))
# `moeplan sweep`'s workload and file options (SWEEP_OPTIONS has its targets and prices)
SWEEP_WORKLOAD = {
    "--profile": _paths_or("plan.json", "run.json"),
    "--micro-batch": COUNTS,
    "--seq-len": COUNTS,
    "--prompt-len": COUNTS,
    "--gen-len": COUNTS,
    "--dtype": SEARCH_NAMES["--dtype"],
    "--zero": st.sampled_from(["0", "1", "2", "3", "-1", ""]),
    "--runtime": st.sampled_from(["moerun", "deepspeed", "deepspeed-sparse", "DeepSpeed", ""]),
    "--simulate-top": COUNTS,
    "--jobs": st.one_of(st.integers(min_value=-2, max_value=2**40), st.text(max_size=6),
                        st.sampled_from(["1", "2", "256", "257"])),
}


@st.composite
def sweep_workload(draw) -> list[str]:
    """A `moeplan sweep` command line for tiny-pr-moe on 2-4 CPU ranks, 1-4 of its workload and
    file options drawn hostile."""
    argv = ["sweep", "--model", "tiny-pr-moe", "--cluster", "local-cpu", "--gpus", "2-4",
            "--global-batch", "8", "--seq-len", "32", "--simulate-top", "2", "--jobs", "1",
            "--out", "sweep.out.csv"]
    return _hostile(draw, argv, SWEEP_WORKLOAD, 4)


REPORT_OPTIONS = {
    "--sweep": _paths_or("sweep.json", "plan.json"),
    "--baseline": st.one_of(st.sampled_from(["tiny-pr-moe", "nope"]), HOSTILE_NAMES),
    "--runs": _paths_or("run.json", "fuzz-run.json", "fuzz-run.json", "plan.json"),
    "--out": st.sampled_from(["report.out", "", ".", "/", "plan.json", "ckpt", "sub/none/r",
                              "hostile/link-dir", "hostile/fifo", "hostile/dangling"]),
    "--jobs": st.one_of(st.integers(min_value=-2, max_value=300), st.text(max_size=4)),
    "--model": st.sampled_from(["tiny-pr-moe", ""]),
    "--mode": st.sampled_from(["train", "infer", "both", ""]),
}


@st.composite
def report_options(draw, run: dict) -> tuple[list[str], str | bytes | None]:
    """(a `moeplan report --sweep` command line with 1-3 options drawn hostile, the text of
    fuzz-run.json: moerun's run.json mutated, keys too, or not a document)."""
    argv = ["report", "--sweep", "sweep.json", "--jobs", "1", "--out", "report.out"]
    return _hostile(draw, argv, REPORT_OPTIONS, 3), draw(st.one_of(
        st.just(None), mutated(run, keys=True), raw_bytes()))


# `moeplan profile`: options each refused before measuring whatever else is given (the other
# options drawn with it are good ones, never the same option: the last one given wins)
PROFILE_REFUSED = st.one_of(
    st.tuples(st.just("--name"), st.sampled_from(["\n", "a\nb", "x\x00", "\x7f", "\t",
                                                  "x" * 201])),
    st.tuples(st.sampled_from(["--nproc", "--gpus-per-node"]),
              st.sampled_from(["0", "-1", "", "x", "1.5", "1e3"])),
    st.tuples(st.just("--nproc"), st.sampled_from(["3", "1", "5"]),
              st.just("--gpus-per-node"), st.just("2")),
    st.tuples(st.just("--backend"), st.sampled_from(["", "x", "NCCL"])),
    st.tuples(st.just("--base"), st.sampled_from(["nope", "../x", "/", "plan.json", "run.json",
                                                  "hostile/fifo", "hostile/dir", " "])),
    st.tuples(st.just("--out"), st.sampled_from(["", ".", "/", "sub/none/p.json", "hostile/dir",
                                                 "hostile/fifo", "hostile/link-dir", "ckpt"])))
PROFILE_GOOD = {"--out": st.just("profile.out.json"), "--backend": st.just("gloo"),
                "--base": st.just("local-cpu"), "--name": st.sampled_from(["m", "measured x"]),
                "--quick": None, "--nproc": st.just("2"), "--gpus-per-node": st.just("2")}


@st.composite
def profile_options(draw) -> list[str]:
    """A `moeplan profile` command line that must be refused before any rank starts."""
    refused = list(draw(PROFILE_REFUSED))
    good = {k: v for k, v in PROFILE_GOOD.items() if k not in refused}
    argv = ["profile"]
    if draw(st.booleans()):
        argv = _hostile(draw, argv, good, 3)
    return argv + refused


VALIDATE_OPTIONS = {
    "--json": None,
    "--max-error": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                             st.sampled_from(["1e400", "-0", "nan", "0", "100"])),
    "--max-phase-error": st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                   st.text(max_size=6)),
}


@st.composite
def validate_options(draw) -> list[str]:
    """A `moeplan validate` command line: the real plan and run (or hostile paths), 1-3 options
    drawn."""
    plan = draw(st.one_of(st.just("plan.json"), _paths_or("run.json")))
    run = draw(st.one_of(st.just("run.json"), _paths_or("plan.json")))
    return _hostile(draw, ["validate", plan, run], VALIDATE_OPTIONS, 3)


@st.composite
def listing_args(draw) -> list[str]:
    """`moeplan models`, `clusters` or `schema` with 0-3 arguments drawn."""
    command = draw(st.sampled_from(["models", "clusters", "schema"]))
    args = st.one_of(st.sampled_from(["--json", "plan", "model", "cluster", "", "-", "--",
                                      "--json=1", "--x", "PLAN"]), st.text(max_size=6))
    return [command, *draw(st.lists(args, max_size=3))]


# `moerun`'s files: outputs, tokenizer, --data drawn as paths, ending at --print-torchrun
MOERUN_PATHS = {
    "--out": _paths_or("run.json", "run.out.json"),
    "--save": _paths_or("ckpt", "save.out", "plan.json"),
    "--tokenizer": _paths_or("plan.json", "fuzz-data.txt"),
    "--force": None,
    "--mode": st.sampled_from(["train", "infer"]),
    "--data": _paths_or("hostile/fifo-idx.bin", "hostile/fifo-idx.idx", "hostile/garbage-idx.bin",
                        "hostile/garbage-idx.idx", "plan.json"),
}


@st.composite
def moerun_paths(draw) -> list[str]:
    """A `moerun --plan plan.json --print-torchrun` command line with 1-4 of its file options
    drawn as paths (directories, FIFOs, links, empty)."""
    return _hostile(draw, ["--plan", "plan.json", "--print-torchrun"], MOERUN_PATHS, 4)


class Measuring(Exception):
    """`moeplan profile` started its ranks: what it should have refused it did not."""


# ---- the targets: (what is drawn, how it is fed to the CLI) ----

MOEPLAN_SEARCH = ["--cluster", "local-cpu", "--gpus", "4", "--global-batch", "8", "--seq-len",
                  "32", "--simulate-top", "2", "--json", "--out", "plan.out.json"]


def _file(work: Path, name: str, content: str | bytes) -> str:
    path = work / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def prepare(work: Path) -> None:
    """A plan of tiny-pr-moe for 2 ranks and one real `moerun` of it (plan.json, run.json, its
    checkpoint ckpt: the teacher of tiny-pr-moe-mos, whose plan is mos.json): the documents the
    plan and run targets mutate."""
    import subprocess

    from moeplan.cli.main import main as moeplan_main

    o = outcome(moeplan_main, ["search", "--model", "tiny-pr-moe", "--cluster", "local-cpu",
                               "--gpus", "2", "--global-batch", "8", "--seq-len", "32",
                               "--out", "plan.json"], work)
    assert o.rc == 0, o
    r = subprocess.run([sys.executable, "-c", "from moeplan.cli.moerun import main; main()",
                        "--plan", "plan.json", "--steps", "2", "--out", "run.json", "--save",
                        "ckpt"], cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    o = outcome(moeplan_main, ["search", "--model", "tiny-pr-moe-mos", "--cluster", "local-cpu",
                               "--gpus", "2", "--global-batch", "8", "--seq-len", "32",
                               "--out", "mos.json"], work)
    assert o.rc == 0, o
    o = outcome(moeplan_main, ["sweep", "--model", "tiny-pr-moe", "--cluster", "local-cpu",
                               "--gpus", "2", "--global-batch", "8", "--seq-len", "32",
                               "--simulate-top", "2", "--jobs", "1", "--out", "sweep.json"], work)
    assert o.rc == 0, o


def targets(work: Path) -> dict:
    """name → (strategy, feed(drawn) → Outcome). `work` holds plan.json and run.json
    (`prepare`)."""
    from moeplan.cli.main import main as moeplan_main
    from moeplan.cli.moerun import main as moerun_main

    hostile_files(work)
    plan = json.loads((work / "plan.json").read_text())
    mos = json.loads((work / "mos.json").read_text())
    run = json.loads((work / "run.json").read_text())
    sweep = json.loads((work / "sweep.json").read_text())
    doc = lambda base: st.one_of(mutated(base), raw_bytes())  # noqa: E731

    def model(text):
        path = _file(work, "fuzz-model.json", text)
        return outcome(moeplan_main, ["search", "--model", path, *MOEPLAN_SEARCH], work)

    def cluster(text):
        path = _file(work, "fuzz-cluster.json", text)
        argv = ["search", "--model", "tiny-pr-moe", "--profile", path, *MOEPLAN_SEARCH[2:]]
        return outcome(moeplan_main, argv, work)

    def plan_validate(text):
        path = _file(work, "fuzz-plan.json", text)
        return outcome(moeplan_main, ["validate", path, "run.json"], work)

    def plan_moerun(text):
        path = _file(work, "fuzz-plan.json", text)
        return outcome(moerun_main, ["--plan", path, "--print-torchrun"], work)

    def run_validate(text):
        path = _file(work, "fuzz-run.json", text)
        return outcome(moeplan_main, ["validate", "plan.json", path], work)

    def search(argv):
        return outcome(moeplan_main, argv, work)

    def data_file(content):
        suffix = [".txt", ".npy", ".bin"][len(content) % 3] if isinstance(content, bytes) else ".txt"
        path = _file(work, f"fuzz-data{suffix}", content)
        return outcome(moerun_main, ["--plan", "plan.json", "--data", path, "--print-torchrun"],
                       work)

    def moerun_argv(argv):
        return outcome(moerun_main, argv, work)

    def mos_plan(text):
        path = _file(work, "fuzz-plan.json", text)
        return outcome(moerun_main, ["--plan", path, "--teacher", "ckpt", "--print-torchrun"],
                       work)

    def hf_config(text):
        path = _file(work, "fuzz-hf.json", text)
        return outcome(moeplan_main, ["search", "--model", path, *MOEPLAN_SEARCH], work)

    def plan_export(text):
        path = _file(work, "fuzz-plan.json", text)
        return outcome(moeplan_main, ["export", path, "--to", "megatron-deepspeed", "--out",
                                      "export.out"], work)

    def fresh_report():
        """No report.out left by an earlier example (one that failed half-way makes every later
        report refuse the folder)."""
        if (work / "report.out").is_dir() and not (work / "report.out").is_symlink():
            shutil.rmtree(work / "report.out")

    def sweep_file(text):
        path = _file(work, "fuzz-sweep.json", text)
        fresh_report()
        return outcome(moeplan_main, ["report", "--sweep", path, "--jobs", "1", "--out",
                                      "report.out"], work)

    def report(drawn):
        argv, run_text = drawn
        if run_text is not None:
            _file(work, "fuzz-run.json", run_text)
        fresh_report()
        return outcome(moeplan_main, argv, work)

    def profile(argv):
        """Within 5 s, and with the launcher replaced: a refusal after the ranks started is a
        failure, never minutes of measuring."""
        import moeplan.cli.main as cli_main
        import moeplan.runtime.launch as launcher

        def refuse(nproc, module, args):
            raise Measuring(f"{nproc} ranks started for {argv}")

        where = [m for m in (launcher, cli_main) if hasattr(m, "launch")]
        real = [m.launch for m in where]
        for m in where:
            m.launch = refuse
        try:
            return outcome(moeplan_main, argv, work, limit_s=5.0)
        finally:
            for m, f in zip(where, real):
                m.launch = f

    def validate(argv):
        return outcome(moeplan_main, argv, work, one_line_rcs=(1, 2))

    return {"model spec": (doc(model_base()), model),
            "cluster profile": (doc(cluster_base()), cluster),
            "plan (validate)": (doc(plan), plan_validate),
            "plan (moerun)": (doc(plan), plan_moerun),
            "MoS plan (moerun)": (doc(mos), mos_plan),
            "moerun options": (moerun_options(), moerun_argv),
            "plan (export)": (doc(plan), plan_export),
            "Hugging Face config": (st.one_of(*(st.one_of(doc(c), hf_numbers(c), hf_numbers(c),
                                                          mutated(c, keys=True, values=HF_NUMBERS))
                                                for c in hf_bases())), hf_config),
            "export options": (export_options(), search),
            "run record": (doc(run), run_validate),
            "search options": (search_options(), search),
            "sweep options": (sweep_options(), search),
            "data file": (st.one_of(raw_bytes(), st.binary(min_size=300, max_size=3000),
                                    st.text(min_size=0, max_size=2000)), data_file),
            "sweep file": (st.one_of(doc(sweep), mutated(sweep, keys=True),
                                     renamed(sweep, "tiny-pr-moe"), renamed(sweep, "local-cpu")),
                           sweep_file),
            "search names and paths": (search_names(), search),
            "sweep workload options": (sweep_workload(), search),
            "report options": (report_options(run), report),
            "profile options": (profile_options(), profile),
            "validate options": (validate_options(), validate),
            "models, clusters, schema": (listing_args(), search),
            "moerun paths": (moerun_paths(), moerun_argv)}
