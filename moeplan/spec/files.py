"""Reading documents that may be hostile, and writing result files so that a reader never sees
half of one (plan.json, run.json, profiles), never replacing or following into anything the
program did not create.

`read_document` reads a JSON document (spec, profile, plan, run, manifest): a FIFO or device is
never opened, and a missing file, a link loop, a huge file, bytes that are not UTF-8, invalid or
too deeply nested JSON are each one `SpecError` line.

`write_atomic` writes beside the target and renames over it. A target that is a symbolic link
is written through to the regular file it names (a link to nothing is refused); anything else
that is not a regular file (a device, a FIFO, a directory) is refused, so `--out /dev/full`
cannot turn a device into a file.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

from moeplan.spec.errors import ConfigError, SpecError

MAX_DOCUMENT_BYTES = 64 * 2**20  # far above any spec, plan, profile or manifest


def read_document(path: Path, what: str) -> object:
    """The parsed JSON of `path` (`what` names it in errors: "ModelSpec", "manifest")."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(f"{path} is not a regular file")
        if st.st_size > MAX_DOCUMENT_BYTES:
            raise SpecError(f"{path} is {st.st_size / 2**20:.0f} MiB: too large for a {what}")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SpecError(f"{what} file {path} does not exist") from None
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{path} is not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except ValueError:  # an integer beyond Python's 4,300-digit conversion limit
        raise SpecError(f"{path} holds a number too long to be part of a {what}") from None
    except RecursionError:
        raise SpecError(f"{path} nests its JSON too deep to be a {what}") from None


def output_path(path: str | Path, flag: str = "--out") -> Path:
    """The regular file a result will be written to (a symbolic link's target), checked before
    any work: an empty name, a missing folder or anything but a regular file is one line."""
    if not str(path).strip():
        raise ConfigError(f"{flag} is empty")
    target = Path(path)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
        if not target.exists():  # written through to a file that exists, never made through one
            raise ConfigError(f"{flag} {path} is a link to {target}, which does not exist; "
                              "refusing to create a file through it")
    if target.exists() and not stat.S_ISREG(target.stat().st_mode):
        raise ConfigError(f"{flag} {path}: not a regular file; refusing to replace it")
    if not target.parent.is_dir():
        raise ConfigError(f"{flag} {path}: folder {target.parent} does not exist")
    return target


def derived_output(path: str | Path, what: str, flag: str = "--out") -> Path:
    """A file the program names itself beside an output (`what` says whose; `flag` names the
    output): written only where nothing but a regular file is (a link is refused, not
    followed)."""
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise ConfigError(f"{target} ({what}) exists and is not a regular file; remove it or "
                          f"choose another {flag}")
    return target


def folder_file(folder: Path, name: str) -> Path:
    """Where `name` goes inside an output folder the program prepared: a name that leaves the
    folder, a link (the file or a folder on its way) or anything but a regular file there is
    refused, never followed or replaced."""
    rel = Path(name)
    if rel.is_absolute() or not rel.parts or any(p in (".", "..") for p in rel.parts):
        raise ConfigError(f"{name!r} would be written outside {folder}")
    for sub in list(rel.parents)[:-1]:
        d = folder / sub
        if d.is_symlink() or (d.exists() and not d.is_dir()):
            raise ConfigError(f"{d} is not a folder this program wrote; remove it or choose "
                              "another --out")
    return derived_output(folder / rel, f"in {folder}")


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Write a unique temporary file beside the target, then rename it over the target (atomic
    on POSIX file systems); never leave the temporary file behind. Text or bytes."""
    target = output_path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}") from None
    try:
        os.fchmod(fd, target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
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


def prepare_folder(out: str, marker: str, what: str) -> Path:
    """An output directory: created here, or an existing empty one, or one this program wrote
    before (it holds `marker`). Never a link, the working directory or a folder above it."""
    folder = Path(out)
    if not str(out).strip():
        raise ConfigError("--out is empty")
    if folder.is_symlink():
        raise ConfigError(f"--out {out} is a symbolic link; name the directory itself")
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(f"--out {out} exists and is not a directory")
        if any(folder.iterdir()) and not (folder / marker).is_file():
            raise ConfigError(f"--out {out} is a directory with files that are not {what}; "
                              "name a new or empty directory")
        if folder.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
            raise ConfigError(f"--out {out} is the working directory or above it")
    else:
        if not folder.parent.is_dir():
            raise ConfigError(f"--out {out}: the folder {folder.parent} does not exist")
        try:
            folder.mkdir()
        except OSError as e:
            raise ConfigError(f"cannot create {out}: {e.strerror}") from None
    return folder
