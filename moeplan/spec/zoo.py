"""Loaders for the built-in model zoo and clusters (JSON under `spec/data/`) and user files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from moeplan.spec.cluster import ClusterProfile
from moeplan.spec.errors import SpecError, UnknownNameError
from moeplan.spec.files import read_document
from moeplan.spec.hf import from_hf, is_hf_config
from moeplan.spec.model import ModelSpec

DATA_DIR = Path(__file__).parent / "data"
T = TypeVar("T", bound=BaseModel)


def _names(kind: str) -> list[str]:
    return sorted(p.stem for p in (DATA_DIR / kind).glob("*.json"))


def model_names() -> list[str]:
    return _names("models")


def cluster_names() -> list[str]:
    return _names("clusters")


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "top level"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def parse_file(path: Path, cls: type[T]) -> T:
    """Read a JSON file into `cls`; every failure is a one-line `SpecError` naming the file —
    also a FIFO or device (never opened: reading one could block for ever), a file too large
    to be a spec, bytes that are not UTF-8, and JSON nested too deep to parse. A model file may
    also be a Hugging Face config.json (`spec.hf`)."""
    data = read_document(path, cls.__name__)
    if cls is ModelSpec and is_hf_config(data):
        stem = path.stem if path.stem != "config" else path.resolve().parent.name
        try:
            return from_hf(data, stem[:200] or "hf-model")
        except (SpecError, ValidationError, ValueError, TypeError) as e:
            why = _one_line(e) if isinstance(e, ValidationError) else str(e)
            raise SpecError(f"{path}: {why}") from None
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{path} is not a valid {cls.__name__}: {_one_line(e)}") from None


def _load(name_or_path: str, kind: str, cls: type[T]) -> T:
    builtin = DATA_DIR / kind / f"{name_or_path}.json"
    if builtin.is_file():
        return parse_file(builtin, cls)
    path = Path(name_or_path)
    if path.suffix == ".json" or os.path.lexists(path):  # a link loop exists, but not its target
        if not os.path.lexists(path):
            raise SpecError(f"{kind[:-1]} file {path} does not exist")
        return parse_file(path, cls)
    known = ", ".join(_names(kind))
    raise UnknownNameError(f"unknown {kind[:-1]} '{name_or_path}'; known: {known} (or a .json file)")


def load_model(name_or_path: str) -> ModelSpec:
    return _load(name_or_path, "models", ModelSpec)


def load_cluster(name_or_path: str) -> ClusterProfile:
    return _load(name_or_path, "clusters", ClusterProfile)
