"""Plan-independent checkpoints, written in parallel and atomically.

Layout of a checkpoint directory:
  manifest.json   format, step, model spec, full shape of every parameter, the writing plan
  rank{r}.pt      {name: (slices, tensor)} for the pieces that rank r owns
Every parameter is described by the `slices()` of the modules that hold it: a tensor-sliced weight
is a range of rows or columns of the full one, expert weights are ranges of the expert dimension —
so a piece is keyed by global expert id and position, never by the writer's ranks. Each distinct
piece is written once (by the lowest rank that holds it). Loading assembles the full tensors from
all pieces and cuts what the reading plan needs, whatever its ep / es / tp / dp.

Atomicity: ranks write into `<dir>.tmp`, rank 0 writes the manifest last and renames the directory
into place (replacing an older checkpoint only after the new one is complete).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from moeplan.errors import ConfigError
from moeplan.runtime.model import GPT

FORMAT = "moeplan-checkpoint-1"


def _pieces(model: GPT) -> dict[str, tuple[tuple, torch.Tensor]]:
    slices = model.slices()
    out = {}
    for name, p in model.named_parameters():
        spec = slices.get(name, ())
        if name.endswith("experts.b2") and not model.get_submodule(name[:-3]).es_rank0:
            spec = spec + (("unused",),)  # only the first expert slice adds b2
        out[name] = (spec, p.detach().cpu().clone())
    return out


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
    (its marker); never a link."""
    if path.is_symlink() or not path.is_dir():
        return False
    if (path / PARTIAL).is_file():
        return True
    try:
        return json.loads((path / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_save_target(directory: str | Path) -> None:
    """Refuse, before any rank starts, a --save target this program may not replace: anything
    that exists and is not a checkpoint it wrote (also its .tmp and .old siblings)."""
    final = Path(directory)
    if not str(directory).strip():
        raise ConfigError("--save is empty")
    for path in (final, final.with_name(final.name + ".tmp"),
                 final.with_name(final.name + ".old")):
        if (path.exists() or path.is_symlink()) and not _ours(path):
            raise ConfigError(f"--save {directory}: {path} exists and is not a moeplan "
                              "checkpoint; refusing to replace it")
    if not final.parent.is_dir():
        raise ConfigError(f"--save {directory}: folder {final.parent} does not exist")


def _remove_ours(path: Path) -> None:
    if path.exists() or path.is_symlink():
        if not _ours(path):
            raise ConfigError(f"{path} exists and is not a moeplan checkpoint; refusing to "
                              "remove it")
        shutil.rmtree(path)


def save(model: GPT, directory: str | Path, step: int, plan_digest: str, rank: int,
         world: int) -> Path:
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        check_save_target(final)
        _remove_ours(tmp)
        tmp.mkdir()
        (tmp / PARTIAL).touch()
    if world > 1:
        dist.barrier()
    torch.save(_owned(_pieces(model), rank, world), tmp / f"rank{rank}.pt")
    if world > 1:
        dist.barrier()
    if rank == 0:
        full_shapes = {}
        for name, p in GPT(model.spec).named_parameters():
            full_shapes[name] = list(p.shape)
        manifest = {"format": FORMAT, "step": step, "world": world, "plan_digest": plan_digest,
                    "model": model.spec.model_dump(mode="json"), "shapes": full_shapes}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        (tmp / PARTIAL).unlink()
        old = final.with_name(final.name + ".old")
        if final.exists():
            _remove_ours(old)
            final.rename(old)
        tmp.rename(final)
        _remove_ours(old)
    if world > 1:
        dist.barrier()
    return final


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {directory} (missing {path.name})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"checkpoint manifest {path} is not JSON: {e.msg}") from None
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a {FORMAT} manifest")
    return manifest


def load_full(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The full (single-device) state and the manifest."""
    manifest = read_manifest(directory)
    full = {name: torch.zeros(shape) for name, shape in manifest["shapes"].items()}
    covered = {name: torch.zeros(shape, dtype=torch.bool) for name, shape in
               manifest["shapes"].items()}
    for r in range(manifest["world"]):
        path = Path(directory) / f"rank{r}.pt"
        if not path.is_file():
            raise ConfigError(f"checkpoint {directory} is incomplete: {path.name} is missing")
        for name, (spec, tensor) in torch.load(path, weights_only=True).items():
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
    """Refuse a checkpoint of another model, naming the first field that differs."""
    want = spec.model_dump(mode="json")
    have = manifest.get("model", {})
    for key in sorted(set(want) | set(have)):
        if want.get(key) != have.get(key):
            raise ConfigError(f"checkpoint {directory} is of another model: {key} "
                              f"{have.get(key)!r} there, {want.get(key)!r} in the plan")
