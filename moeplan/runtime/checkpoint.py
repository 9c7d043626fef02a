"""Plan-independent checkpoints, written in parallel and atomically.

Layout of a checkpoint directory:
  manifest.json   format, the checkpoint's id, step, model spec, full shape and dtype of every
                  parameter (and of its optimizer states), the writing plan, the sha256 of every
                  shard; for a training run the optimizer's step count, the learning-rate
                  schedule's length and the data seed: what resuming needs to continue exactly
  rank{r}.pt      {"id": the checkpoint's id, "pieces": {name: (slices, tensor)}} for the pieces
                  that rank r owns
Every parameter is described by the `slices()` of the modules that hold it: a tensor-sliced weight
is a range of rows or columns of the full one, expert weights are ranges of the expert dimension —
so a piece is keyed by global expert id and position, never by the writer's ranks. Adam's two
moments of a parameter (`optimizer.exp_avg.<name>`, `optimizer.exp_avg_sq.<name>`) are pieces with
the parameter's slices, so they reshard across plans exactly as the weights do. Each distinct
piece is written once (by the lowest rank that holds it). Loading assembles the full tensors from
all pieces and cuts what the reading plan needs, whatever its ep / es / tp / dp.

Atomicity: ranks write into `<dir>.tmp`, rank 0 writes the manifest last and renames the directory
into place (replacing an older checkpoint only after the new one is complete), holding
`<dir>.lock` throughout; loading checks every shard's checksum, id, dtypes and shapes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import stat
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moeplan.runtime.model import GPT
from moeplan.runtime.optim import MOMENTS
from moeplan.spec.errors import ConfigError, SpecError
from moeplan.spec.files import derived_output, read_document

FORMAT = "moeplan-checkpoint-3"  # 3: optimizer states and the training position
READABLE = (FORMAT, "moeplan-checkpoint-2")  # 2: weights only (id, checksums, dtypes)
OPTIMIZER = "optimizer."


def moment_name(moment: str, name: str) -> str:
    return f"{OPTIMIZER}{moment}.{name}"


def _pieces(model: GPT, moments: dict[str, dict[str, torch.Tensor]] | None = None
            ) -> dict[str, tuple[tuple, torch.Tensor]]:
    slices = model.slices()
    out = {}
    for name, p in model.named_parameters():
        spec = slices.get(name, ())
        if name.endswith("experts.b2") and not model.get_submodule(name[:-3]).es_rank0:
            spec = spec + (("unused",),)  # only the first expert slice adds b2
        out[name] = (spec, p.detach().cpu().clone())
        state = (moments or {}).get(name, {})
        for moment in MOMENTS:
            if moment in state:
                out[moment_name(moment, name)] = (spec, state[moment].detach().cpu().clone())
    return out


@dataclass(frozen=True)
class Position:
    """Where a training run stands: steps taken, the optimizer's step count, the learning-rate
    schedule's length and the data seed (step s's batch comes from (seed, s))."""

    step: int
    optimizer_steps: int
    schedule_steps: int
    seed: int
    loss_scaler: dict | None = None  # fp16's dynamic loss scale and its counters


def _owned(mine: dict, rank: int, world: int) -> dict:
    """The pieces no lower rank holds (keys compared across ranks by their slice description)."""
    keys = {name: spec for name, (spec, _) in mine.items()}
    everyone = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, keys)
    else:
        everyone = [keys]
    taken = set()
    for r in range(rank):
        taken |= set(everyone[r].items())
    return {name: piece for name, piece in mine.items()
            if (name, piece[0]) not in taken and piece[0][-1:] != (("unused",),)}


PARTIAL = ".moeplan-partial"  # marks a checkpoint directory this program is still writing


def _ours(path: Path) -> bool:
    """A directory this program wrote: a complete checkpoint (its manifest) or a partial one
    (its marker); never a link. The manifest is read as a hostile document (a FIFO is never
    opened)."""
    if path.is_symlink() or not path.is_dir():
        return False
    if (path / PARTIAL).is_file():
        return True
    try:
        manifest = read_document(path / "manifest.json", "manifest")
    except SpecError:
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_save_target(directory: str | Path) -> None:
    """Refuse, before any rank starts, a --save target this program may not replace: anything
    that exists and is not a checkpoint it wrote (also its .tmp and .old siblings)."""
    if not str(directory).strip():
        raise ConfigError("--save is empty")
    final = Path(os.path.abspath(directory))  # `.` and `..` have no name of their own
    if final == Path.cwd() or final in Path.cwd().parents or final.parent == final:
        raise ConfigError(f"--save {directory}: the working directory or a folder above it; "
                          "give a new folder for the checkpoint")
    for path in (final, final.with_name(final.name + ".tmp"),
                 final.with_name(final.name + ".old")):
        if (path.exists() or path.is_symlink()) and not _ours(path):
            raise ConfigError(f"--save {directory}: {path} exists and is not a moeplan "
                              "checkpoint; refusing to replace it")
    derived_output(final.with_name(final.name + ".lock"), "the checkpoint's lock", "--save")
    if not final.parent.is_dir():
        raise ConfigError(f"--save {directory}: folder {final.parent} does not exist")


def _remove_ours(path: Path) -> None:
    if path.exists() or path.is_symlink():
        if not _ours(path):
            raise ConfigError(f"{path} exists and is not a moeplan checkpoint; refusing to "
                              "remove it")
        shutil.rmtree(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _locked(final: Path, rank: int):
    """Rank 0 holds `<dir>.lock` while the job saves: a second job saving to the same place
    fails at once instead of mixing its shards with this one's. The file stays (removing it
    could let two jobs lock two different files of that name)."""
    if rank != 0:
        yield
        return
    path = final.with_name(final.name + ".lock")
    try:  # never through a link, never blocking on a FIFO put there since the check
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_NONBLOCK, 0o666)
    except OSError as e:
        raise ConfigError(f"cannot open {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path} is not a regular file; refusing to lock it")
    with os.fdopen(fd, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"another job is saving to {final}") from None
        yield


def save(model: GPT, directory: str | Path, step: int, plan_digest: str, rank: int,
         world: int, moments: dict[str, dict[str, torch.Tensor]] | None = None,
         position: Position | None = None) -> Path:
    """`moments`: per parameter name, this rank's piece of its Adam moments (`optim`).
    Every rank writes its shard into `<dir>.tmp` (marked partial), rank 0 then writes the
    manifest — the checkpoint's id, each shard's checksum, every tensor's dtype and shape —
    last, and renames the directory into place; files and directories are fsynced first."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    box = [uuid.uuid4().hex]
    with _locked(final, rank):
        if rank == 0:
            check_save_target(final)
            _remove_ours(tmp)
            tmp.mkdir()
            (tmp / PARTIAL).touch()
        if world > 1:
            dist.broadcast_object_list(box, src=0)  # one id for the shards of one checkpoint
        shard = tmp / f"rank{rank}.pt"
        torch.save({"id": box[0], "pieces": _owned(_pieces(model, moments), rank, world)},
                   shard)
        _fsync(shard)
        if world > 1:
            dist.barrier()
        if rank == 0:
            _finish(model, final, tmp, box[0], step, plan_digest, world,
                    bool(moments), position)
        if world > 1:
            dist.barrier()
    return final


def _finish(model: GPT, final: Path, tmp: Path, ckpt_id: str, step: int, plan_digest: str,
            world: int, moments: bool, position: Position | None) -> None:
    with torch.device("meta"):  # shapes only
        full = dict(GPT(model.spec).named_parameters())
    if moments:
        full.update({moment_name(m, name): p for name, p in list(full.items())
                     for m in MOMENTS})
    manifest = {"format": FORMAT, "id": ckpt_id, "step": step, "world": world,
                "plan_digest": plan_digest, "model": model.spec.model_dump(mode="json"),
                "shapes": {name: list(p.shape) for name, p in full.items()},
                "dtypes": {name: str(p.dtype).removeprefix("torch.") for name, p in full.items()},
                "sha256": {f"rank{r}.pt": _sha256(tmp / f"rank{r}.pt") for r in range(world)}}
    if position is not None:
        manifest["position"] = asdict(position)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _fsync(tmp / "manifest.json")
    (tmp / PARTIAL).unlink()
    _fsync(tmp)
    old = final.with_name(final.name + ".old")
    if final.exists():
        _remove_ours(old)
        final.rename(old)  # until the next rename only .old holds it: `resolve` finds it there
    tmp.rename(final)
    _fsync(final.parent)
    _remove_ours(old)


def resolve(directory: str | Path) -> Path:
    """The checkpoint at `directory`, or its `.old` copy when a save was interrupted between
    moving the previous one aside and putting the new one in place."""
    final = Path(directory)
    if not Path(os.path.abspath(final)).name:  # "/": no name to take a sibling of
        return final
    old = Path(os.path.abspath(final))
    old = old.with_name(old.name + ".old")
    if not final.exists() and (old / "manifest.json").is_file():
        return old
    return final


MAX_WORLD = 1 << 20


def _check_manifest(m: dict, path: Path) -> None:
    """Types and consistency of a manifest's fields, so that a rank never meets a malformed
    one: a positive world, a checksum for each of its shards, a shape and dtype per tensor."""
    def bad(what: str) -> ConfigError:
        return ConfigError(f"checkpoint manifest {path}: {what}")

    for key in ("id", "world", "shapes", "dtypes", "sha256", "model"):
        if key not in m:
            raise bad(f"has no {key!r}")
    world = m["world"]
    if type(world) is not int or not 1 <= world <= MAX_WORLD:
        raise bad(f"world {world!r} is not a number of ranks")
    if not isinstance(m["id"], str):
        raise bad("its id is not text")
    sha = m["sha256"]
    if not isinstance(sha, dict) or set(sha) != {f"rank{r}.pt" for r in range(world)} or not all(
            isinstance(v, str) for v in sha.values()):
        raise bad(f"its checksums do not name the {world} shards rank0.pt..rank{world - 1}.pt")
    shapes, dtypes = m["shapes"], m["dtypes"]
    if not isinstance(shapes, dict) or not isinstance(dtypes, dict) or set(shapes) != set(dtypes):
        raise bad("shapes and dtypes do not name the same tensors")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"{name}: shape {shape!r} is not a list of sizes")
    if not isinstance(m["model"], dict):
        raise bad("its model is not a model spec")
    pos = m.get("position")
    counts = set(Position.__annotations__) - {"loss_scaler"}
    if pos is not None and (not isinstance(pos, dict) or not counts <= set(pos)
                            or not set(pos) <= set(Position.__annotations__)
                            or not all(type(pos[k]) is int and pos[k] >= 0 for k in counts)):
        raise bad(f"position {pos!r} is not {sorted(counts)} as whole numbers")
    scaler = (pos or {}).get("loss_scaler")
    if scaler is not None and not (
            isinstance(scaler, dict) and set(scaler) == {"scale", "clean", "left", "skipped"}
            and all(type(v) in (int, float) and math.isfinite(v) and v >= 0
                    for v in scaler.values()) and scaler["scale"] > 0):
        raise bad(f"loss scaler {scaler!r} is not a positive scale and its counters")


def read_manifest(directory: str | Path) -> dict:
    path = resolve(directory) / "manifest.json"
    if not os.path.lexists(path):
        raise ConfigError(f"no checkpoint at {directory} (missing {path.name})")
    manifest = read_document(path, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE:
        raise ConfigError(f"{path} is not a {FORMAT} manifest")
    _check_manifest(manifest, path)
    return manifest


def _shard(directory: Path, r: int, manifest: dict, mmap: bool = False) -> dict:
    """Rank r's pieces, after checking the file's checksum, the checkpoint id it carries and
    every piece's name, dtype and slice against the manifest."""
    path = directory / f"rank{r}.pt"
    if not path.is_file():
        raise ConfigError(f"checkpoint {directory} is incomplete: {path.name} is missing")
    if _sha256(path) != manifest["sha256"].get(path.name):
        raise ConfigError(f"checkpoint {directory}: {path.name} does not match its checksum "
                          "(corrupted or replaced)")
    try:
        shard = torch.load(path, weights_only=True, mmap=mmap)
    except Exception as e:  # a file torch cannot read as weights is not a shard
        raise ConfigError(f"checkpoint {directory}: {path.name} is not a weights file "
                          f"({type(e).__name__})") from None
    if not isinstance(shard, dict) or shard.get("id") != manifest["id"] or not isinstance(
            shard.get("pieces"), dict):
        raise ConfigError(f"checkpoint {directory}: {path.name} belongs to another checkpoint")
    for name, piece in shard["pieces"].items():
        _check_piece(directory, r, name, piece, manifest)
    return shard["pieces"]


def _check_piece(directory: Path, r: int, name: str, piece, manifest: dict) -> None:
    where = f"checkpoint {directory}: {name} in rank{r}.pt"
    want = manifest["dtypes"].get(name)
    if not (isinstance(piece, (tuple, list)) and len(piece) == 2
            and isinstance(piece[1], torch.Tensor)):
        raise ConfigError(f"{where} is not a slice and a tensor")
    spec, tensor = piece
    if name not in manifest["shapes"] or str(tensor.dtype).removeprefix("torch.") != want:
        raise ConfigError(f"{where} is not a {want} tensor of the model")
    shape = list(manifest["shapes"][name])
    if not isinstance(spec, (tuple, list)) or not all(
            isinstance(s, (tuple, list)) and len(s) == 3 and all(type(x) is int for x in s)
            for s in spec):
        raise ConfigError(f"{where}: its slice {spec!r} is not (dim, start, stop) triples")
    for dim, start, stop in spec:
        if not (0 <= dim < len(shape) and 0 <= start <= stop <= shape[dim]):
            raise ConfigError(f"{where}: slice {dim}:{start}:{stop} is outside {shape}")
        shape[dim] = stop - start
    if list(tensor.shape) != shape:
        raise ConfigError(f"{where} has shape {list(tensor.shape)}, its slice {shape}")


def verify(directory: str | Path) -> dict:
    """The manifest, after checking every shard as loading will (checksums, ids, dtypes,
    slices; tensors memory-mapped, not read): for the launcher, before any rank starts."""
    manifest = read_manifest(directory)
    where = resolve(directory)
    for r in range(manifest["world"]):
        _shard(where, r, manifest, mmap=True)
    return manifest


def load_full(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The full (single-device) state and the manifest, every piece checked against it."""
    manifest = read_manifest(directory)
    where = resolve(directory)
    full = {name: torch.zeros(shape) for name, shape in manifest["shapes"].items()}
    covered = {name: torch.zeros(shape, dtype=torch.bool) for name, shape in
               manifest["shapes"].items()}
    for r in range(manifest["world"]):
        for name, (spec, tensor) in _shard(where, r, manifest).items():
            view, mask = full[name], covered[name]
            for dim, start, stop in spec:
                view = view.narrow(dim, start, stop - start)
                mask = mask.narrow(dim, start, stop - start)
            view.copy_(tensor)
            mask.fill_(True)
    for name, mask in covered.items():
        if not mask.all():
            raise ConfigError(f"checkpoint {directory} does not cover all of {name}")
    return full, manifest


def check_model(manifest: dict, spec, directory: str | Path) -> None:
    """Refuse a checkpoint of another model, naming the first field that differs, or whose
    tensors are not that model's (the shapes loading allocates come from the manifest)."""
    want = spec.model_dump(mode="json")
    have = manifest.get("model", {})
    for key in sorted(set(want) | set(have)):
        if want.get(key) != have.get(key):
            raise ConfigError(f"checkpoint {directory} is of another model: {key} "
                              f"{have.get(key)!r} there, {want.get(key)!r} in the plan")
    with torch.device("meta"):  # shapes only, nothing allocated
        shapes = {name: list(p.shape) for name, p in GPT(spec).named_parameters()}
    weights = {k: v for k, v in manifest["shapes"].items() if not k.startswith(OPTIMIZER)}
    moments = {k: v for k, v in manifest["shapes"].items() if k.startswith(OPTIMIZER)}
    if weights != shapes or moments and moments != {moment_name(m, name): shape for name, shape
                                                    in shapes.items() for m in MOMENTS}:
        raise ConfigError(f"checkpoint {directory}: its tensors are not those of {spec.name}")


def position(manifest: dict) -> Position | None:
    """Where the checkpointed training run stood, when it holds optimizer states."""
    pos = manifest.get("position")
    if pos is None or not any(k.startswith(OPTIMIZER) for k in manifest["shapes"]):
        return None
    return Position(**pos)


def split(full: dict[str, torch.Tensor]) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(weights, {parameter name: its moments}) of a loaded full state."""
    weights = {k: v for k, v in full.items() if not k.startswith(OPTIMIZER)}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in full.items():
        if k.startswith(OPTIMIZER):
            moment, name = k[len(OPTIMIZER):].split(".", 1)
            moments.setdefault(name, {})[moment] = v
    return weights, moments
