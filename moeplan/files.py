"""Writing result files so that a reader never sees half of one (plan.json, run.json, profiles)."""

from __future__ import annotations

from pathlib import Path

from moeplan.errors import ConfigError


def write_atomic(path: str | Path, text: str) -> None:
    """Write beside the target, then rename over it (atomic on POSIX file systems)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}") from None
