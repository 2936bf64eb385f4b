"""Atomic writes and parameter hashes: every cached file is all-or-nothing and says what made it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from her2lab.errors import OutputError


def param_hash(params: Mapping[str, Any]) -> str:
    """A short, order-independent hash of JSON-serialisable parameters."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A killed process leaves at most a ``.tmp`` file behind, never a half-written ``path``.
    The file gets the mode a plain ``open()`` would give it (``0o666`` less the umask), so a
    group-shared data folder stays shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file 0600 whatever the umask.
        with contextlib.suppress(PermissionError):  # disks without Unix modes (some SMB mounts)
            os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask_at_import() -> int:
    # os.umask can only be read by setting it; done once, before any thread of ours runs.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def current_umask() -> int:
    """The process umask, read without changing it (setting it to read it races with threads).

    Linux reports it in ``/proc/self/status``; elsewhere the umask at import time is used.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` if needed and prove it is writable, or raise a one-line :class:`OutputError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputError(
            f"{path}: {what} is not writable ({exc.strerror or exc}); "
            "choose another location (e.g. paths.data_dir=/some/writable/dir)"
        ) from None
    return path


def write_h5(path: str | os.PathLike, datasets: Mapping[str, Any], attrs: Mapping[str, Any]) -> None:
    """Write an HDF5 file atomically: built in memory, then written to disk in one go.

    HDF5 never touches the disk itself, so a full disk is a plain ``OSError`` from the final write
    (HDF5 failing mid-file leaves library state that can crash the process at exit).
    ``datasets`` values are arrays, or ``(array, {"compression": …})`` pairs.
    """
    import io

    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        for name, value in datasets.items():
            data, kw = value if isinstance(value, tuple) else (value, {})
            f.create_dataset(name, data=data, **kw)
        for k, v in attrs.items():
            f.attrs[k] = v
    with atomic_path(path) as tmp:
        # No fsync: the rename makes a killed process harmless, and a sync per slide cost
        # about 1 ms per patch of extraction throughput on small slides.
        tmp.write_bytes(buf.getbuffer())


#: ``errno`` values that mean the disk (or the user's quota) is full.
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
#: The fix a full disk under the cohort's cache calls for.
SPACE_FIX = "free space or choose another cohort.cache_dir"


def write_error(path: str | os.PathLike, exc: OSError, fix: str = SPACE_FIX) -> OutputError:
    """A one-line :class:`OutputError` for a failed write: the file, why ("disk full") and the fix."""
    full = exc.errno in FULL_DISK_ERRNOS
    why = f"disk full: {exc.strerror or exc}" if full else (exc.strerror or f"{type(exc).__name__}: {exc}")
    return OutputError(f"{path}: could not write ({why}); {fix}")
