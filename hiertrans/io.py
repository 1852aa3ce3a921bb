"""Files on disk: writes that never leave anything half-done (the one place that does temp-file +
rename), and where hiertrans caches what it builds."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; on success rename it over `path`.

    A failure (or a kill) in the `with` body leaves `path` as it was and no temporary file behind
    (after a kill, a hidden `.name.<id>.tmp` may remain, never a truncated `path`). Missing parent
    directories are created. The file gets the usual umask permissions (opened with "x", not
    mkstemp's 0600).

        with atomic_write("out.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    """
    if "w" not in mode:
        raise ValueError(f"atomic_write writes whole files: mode must contain 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path | None]:
    """Build a directory in a temporary sibling and move it into place with one rename.

    Yields the temporary directory to fill, or None when `path` already exists (nothing to do).
    Concurrent writers (DDP ranks, two jobs) are safe: the first rename wins, the others discard
    their copy; an interrupted build leaves no half-written `path`.

        with atomic_directory(cache / "digits") as tmp:
            if tmp is not None:
                write_images(tmp)
    """
    final = Path(path)
    if final.is_dir():
        yield None
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-tmp-", dir=final.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # a real failure, not a lost race against another writer
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once the rename succeeded


def cache_dir() -> Path:
    """`$HIERTRANS_CACHE`, else `$XDG_CACHE_HOME/hiertrans`, else `~/.cache/hiertrans`."""
    if os.environ.get("HIERTRANS_CACHE"):
        return Path(os.environ["HIERTRANS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hiertrans"
