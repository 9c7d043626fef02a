"""Writing result files so that a reader never sees half of one (plan.json, run.json, profiles),
and never replacing or following into anything the program did not create.

`write_atomic` writes beside the target and renames over it. A target that is a symbolic link
is written through to the regular file it names; anything else that is not a regular file (a
device, a FIFO, a directory) is refused, so `--out /dev/full` cannot turn a device into a file.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from moeplan.spec.errors import ConfigError


def output_path(path: str | Path, flag: str = "--out") -> Path:
    """The regular file a result will be written to (a symbolic link's target), checked before
    any work: an empty name, a missing folder or anything but a regular file is one line."""
    if not str(path).strip():
        raise ConfigError(f"{flag} is empty")
    target = Path(path)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    if target.exists() and not stat.S_ISREG(target.stat().st_mode):
        raise ConfigError(f"{flag} {path}: not a regular file; refusing to replace it")
    if not target.parent.is_dir():
        raise ConfigError(f"{flag} {path}: folder {target.parent} does not exist")
    return target


def write_atomic(path: str | Path, text: str) -> None:
    """Write a unique temporary file beside the target, then rename it over the target (atomic
    on POSIX file systems); never leave the temporary file behind."""
    target = output_path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}") from None
    try:
        os.fchmod(fd, target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)  # ours: created just above
        raise ConfigError(f"cannot write {path}: {e.strerror}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
