"""Text corpora of any size as one memory-mapped byte stream.

A corpus is the byte stream the language model reads: its documents (files, or the rows of a
Hugging Face data set) joined with one `SEPARATOR` byte between consecutive non-empty documents;
empty documents contribute nothing. It is never read into RAM: `load_corpus` returns a uint8
tensor over a read-only memory map (`mmap` with `PROT_READ`, `MAP_SHARED`), so every DDP rank and
every loader worker on a machine shares the same page-cache pages, nothing is copied per process,
and mapping a 100 GB file costs no commit charge and no start-up time.

Sources (`path`):
- `None`: the Python standard library's own source, every `.py` file under
  `sysconfig.get_paths()["stdlib"]` sorted by relative posix path, without `site-packages`,
  `dist-packages` (installed packages differ between machines) and `__pycache__`.
- a file: its bytes, as they are, mapped in place (no copy). A `.gz` file is decompressed once
  into the cache. enwik8 (exactly 100,000,000 bytes, or a name containing "enwik8") takes the
  standard 90% / 5% / 5% split (see `split_sizes`). A file whose start (first 8 KiB) is not UTF-8
  text, binary or in another encoding, is an error that names it and says how to convert it;
  `allow_binary=True` reads such a file byte for byte as it is (a byte-level model can learn any
  bytes, but that is rarely what a misnamed path meant).
- a directory: every file below it, recursively in sorted order, that is not hidden (no component
  starting with ".") and looks like text (its first 8 KiB contain no NUL byte). Binary files left
  out and text files that are not UTF-8 are named in a warning when the corpus is built; a
  directory with no text file at all is an error that names what it found.
- Hugging Face `datasets` from local disk, read from the column `text_column` (default "text"): a
  folder written by `Dataset.save_to_disk`, or a `.parquet`, `.jsonl` or `.arrow` file. Rows are
  documents, stored UTF-8 as Arrow stores them (checked to be valid UTF-8), nulls and empty strings
  dropped. Nothing touches the network (the files are read by datasets' local readers).

Why directories and data sets become one cached file, and single files are mapped in place: a
window read must be one slice of one map. A virtual concatenation over one map per file would turn
the stdlib's ~2,000 small files into ~2,000 maps (against `vm.max_map_count` and open-file limits)
and every window that crosses a file boundary into an index search, several slices and a copy to
put the separator in; the train/val/test split and the exact-bpb windows would all have to go
through that layer. One concatenated file costs one sequential pass and the corpus' size on disk,
once, and then every read is a zero-copy slice. A single file is already that stream, so it is
mapped where it is. Data sets must be converted anyway (Arrow rows -> one byte stream).

The cache lives under `hiertrans.io.cache_dir()/text` (`$HIERTRANS_CACHE` moves it), one
directory per source version, named after a fingerprint of the source (paths, sizes and
modification times of its files; a `save_to_disk` folder's own `_fingerprint`; the column): a
changed source is rebuilt and the stale entry removed. Each entry holds `corpus.bin` (the stream),
`doc_starts.int64` (where each document starts: the index of document offsets) and `source.json`.
An entry is built in a temporary directory and renamed into place (`hiertrans.io.atomic_directory`),
so an interrupted build leaves nothing half-written. Concurrent processes (DDP ranks, loader
workers, two jobs) take a file lock: one builds, the others wait for it, rank zero first; if the
build fails with a data error, the ranks that waited raise the same error instead of redoing it.
Start-up with the cache in place is a `stat` per source file and one `mmap`, whatever the size.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import sysconfig
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

try:  # POSIX advisory locks; elsewhere concurrent builders still cannot corrupt the cache (atomic rename)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from hiertrans.io import atomic_directory, atomic_write, cache_dir

log = logging.getLogger(__name__)


class CorpusError(ValueError):
    """Bad data in a corpus source (empty, not text, missing column): the message names the source."""


SEPARATOR = b"\n"  # between consecutive non-empty documents: a visible boundary that costs one byte
ENWIK8_BYTES = 100_000_000
SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a file as binary
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
HF_FILE_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".arrow": "arrow"}
CACHE_FORMAT = 1  # bump when the bytes a source turns into change: every cached corpus is rebuilt
CORPUS_FILE, DOC_STARTS_FILE, SOURCE_FILE = "corpus.bin", "doc_starts.int64", "source.json"
COPY_BYTES = 16 << 20  # read/write granularity while building (bounded memory whatever the corpus)
PROGRESS_MIN_BYTES = 64 << 20  # smaller sources build in about a second: no progress bar
STALE_SECONDS = 3600  # lock and error files older than this are leftovers of failed builds
FOLLOWER_HEAD_START = 1.0  # seconds ranks other than zero let rank zero take the build lock first


# ---------------------------------------------------------------------------------------------
# file listing


def _sorted_walk(root: Path, keep_dir: Callable[[str], bool], keep_file: Callable[[str], bool]) -> list[Path]:
    """Files under `root` accepted by the filters, sorted by relative posix path (OS-independent)."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        # pruning in place keeps os.walk out of skipped trees (site-packages is most of the time)
        dirnames[:] = [d for d in dirnames if keep_dir(d)]
        rel = Path(dirpath).relative_to(root)
        rels += [(rel / f).as_posix() for f in filenames if keep_file(f)]
    return [root / r for r in sorted(rels)]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The default corpus' files: every `.py` under the stdlib, sorted, without installed packages."""
    root = Path(root) if root is not None else stdlib_root()
    return _sorted_walk(root, lambda d: d not in STDLIB_SKIP_DIRS, lambda f: f.endswith(".py"))


def _visible_files(directory: Path) -> list[Path]:
    return _sorted_walk(directory, lambda d: not d.startswith("."), lambda f: not f.startswith("."))


def looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(SNIFF_BYTES)


def not_utf8(head: bytes) -> str | None:
    """Why `head`, the first bytes of a file, is not UTF-8 text ("binary: ...", "not UTF-8: ..."), or None
    when it is (a multi-byte character cut off at the end of `head` counts as text)."""
    if (nul := head.find(b"\0")) >= 0:
        return f"binary: a NUL byte at offset {nul}"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.reason == "unexpected end of data" and err.start >= len(head) - 3:
            return None
        return f"not UTF-8: byte 0x{head[err.start]:02x} at offset {err.start}"
    return None


def what_to_do(why: str) -> str:
    return ("if it is text in another encoding, convert it: iconv -f <encoding> -t utf-8" if why.startswith("not")
            else "a binary file is rarely what a language model should read: pass text files")


def warn_not_utf8(path: Path, head: bytes) -> None:
    """A warning naming a corpus file that is not UTF-8 text, and what to do; nothing for a text file."""
    if (why := not_utf8(head)) is not None:
        warnings.warn(f"corpus file {str(path)!r} is {why} in its first {SNIFF_BYTES} bytes; the model reads its "
                      f"bytes as they are ({what_to_do(why)})", stacklevel=2)


def check_utf8(path: Path, head: bytes) -> None:
    """`CorpusError` naming a single-file corpus that is not UTF-8 text, with what to do about it."""
    if (why := not_utf8(head)) is not None:
        raise CorpusError(f"corpus file {str(path)!r} is {why} in its first {SNIFF_BYTES} bytes; "
                          f"{what_to_do(why)}, or pass allow_binary=True (--data.init_args.allow_binary=true) "
                          "to train on its bytes as they are")


def text_files(directory: str | os.PathLike) -> list[Path]:
    """Non-hidden files under `directory` whose first 8 KiB hold no NUL byte, sorted by relative path."""
    return [f for f in _visible_files(Path(directory)) if f.is_file() and looks_like_text(f)]


def _stats(files: Iterable[Path], root: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of each file that exists (a dangling link is no file)."""
    out = []
    for f in files:
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        out.append((f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return out


# ---------------------------------------------------------------------------------------------
# memory maps


# One read-only map per file and process, keyed by (path, size, mtime_ns): every dataset, split and
# repeated setup() shares it (and forked loader workers inherit it).
_MAPS: dict[tuple[str, int, int], Tensor] = {}
_MAP_KEYS: dict[int, tuple[str, int, int]] = {}  # storage address -> key, to pickle views by reference
_BUFFERS: dict[tuple[str, int, int], mmap.mmap] = {}


def map_file(path: str | os.PathLike) -> Tensor:
    """The bytes of the non-empty file `path` as a 1-D uint8 tensor over a read-only memory map.

    Never write to it: the pages are mapped without write permission (a write kills the process).
    Pickles by reference (see `FileSlice`), so sending it to a worker process copies no bytes.
    """
    path = Path(path).absolute()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _MAPS:
        if st.st_size == 0:
            raise ValueError(f"cannot map the empty file {str(path)!r}")
        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the map outlives the descriptor
        if hasattr(mmap, "MADV_RANDOM"):
            buffer.madvise(mmap.MADV_RANDOM)  # random crops: read no neighbouring pages ahead from disk
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": read-only on purpose
            data = torch.frombuffer(buffer, dtype=torch.uint8)
        _MAPS[key], _BUFFERS[key] = data, buffer
        _MAP_KEYS[data.untyped_storage().data_ptr()] = key
    return _MAPS[key]


def release_pages(data: Tensor) -> None:
    """Unmap the pages of `data`'s mapped file that this process has touched from its resident set.

    They stay in the kernel's page cache (shared, reclaimable) and the next read maps them again
    with a minor fault. Random crops need it: each maps a whole page-cache folio (up to 2 MiB on
    recent kernels) into the process, so its RSS would otherwise grow by that per crop until the
    whole corpus counted as resident. A no-op for tensors that are not mapped files.
    """
    buffer = _BUFFERS.get(_MAP_KEYS.get(data.untyped_storage().data_ptr()))
    if buffer is not None and hasattr(mmap, "MADV_DONTNEED"):
        buffer.madvise(mmap.MADV_DONTNEED)


@dataclass(frozen=True)
class FileSlice:
    """A picklable reference to `map_file(path)[start : start + length]`: what datasets pickle instead
    of the bytes (loader workers started with spawn/forkserver re-map the file, copying nothing)."""

    path: str
    size: int
    mtime_ns: int
    start: int
    length: int

    @classmethod
    def of(cls, data: Tensor) -> FileSlice | None:
        """The reference for a contiguous view of a mapped file, else None."""
        key = _MAP_KEYS.get(data.untyped_storage().data_ptr())
        if key is None or data.dim() != 1 or not data.is_contiguous() or data.dtype != torch.uint8:
            return None
        return cls(*key, start=data.storage_offset(), length=len(data))

    def open(self) -> Tensor:
        data = map_file(self.path)
        if _MAP_KEYS[data.untyped_storage().data_ptr()] != (self.path, self.size, self.mtime_ns):
            raise RuntimeError(f"{self.path} changed on disk while a corpus was mapped from it")
        return data[self.start : self.start + self.length]


def pickle_state(state: dict[str, Any]) -> dict[str, Any]:
    """A dataset's `__dict__` with mapped tensors swapped for `FileSlice` references."""
    return {k: (FileSlice.of(v) or v) if isinstance(v, Tensor) else v for k, v in state.items()}


def unpickle_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.open() if isinstance(v, FileSlice) else v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class Source:
    """What `path` names, and how to turn it into a byte stream.

    `kind`: "file" (mapped in place), "gzip", "directory", "stdlib" (built into the cache), or a
    Hugging Face kind: "saved" (a `save_to_disk` folder), "parquet", "json", "arrow".
    """

    kind: str
    path: Path
    text_column: str = "text"
    files: tuple[Path, ...] = field(default=(), compare=False)  # directory candidates, before sniffing

    @property
    def description(self) -> str:
        if self.kind == "stdlib":
            return f"the stdlib .py files under {self.path}"
        return f"column {self.text_column!r} of {self.path}" if self.is_dataset else str(self.path)

    @property
    def is_dataset(self) -> bool:
        return self.kind in ("saved", *HF_FILE_SUFFIXES.values())

    def fingerprint(self) -> list:
        """Everything that decides the bytes: a different fingerprint is a different corpus."""
        if self.kind in ("stdlib", "directory"):
            return [CACHE_FORMAT, self.kind, _stats(self.files, self.path)]
        if self.kind == "saved":
            state = json.loads((self.path / "state.json").read_text())
            return [CACHE_FORMAT, self.kind, self.text_column, state.get("_fingerprint"),
                    _stats(_visible_files(self.path), self.path)]
        return [CACHE_FORMAT, self.kind, self.text_column, _stats([self.path], self.path.parent)]

    def entry_name(self) -> str:
        """`<name>-<source id>-<version>`: entries of one source share a prefix (stale ones are pruned)."""
        name = "stdlib" if self.kind == "stdlib" else re.sub(r"[^\w.+-]", "_", self.path.name)[:48] or "corpus"
        identity = [self.kind, str(self.path), self.text_column if self.is_dataset else None]
        return f"{name}-{_digest(identity)}-{_digest(self.fingerprint())}"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:12]


def is_saved_dataset(directory: Path) -> bool:
    return (directory / "state.json").is_file() and (directory / "dataset_info.json").is_file()


def find_source(path: str | os.PathLike | None = None, text_column: str = "text") -> Source:
    """The `Source` that `path` names; `ValueError` for a missing path, an empty directory, a
    DatasetDict folder, or a `text_column` given for a source that has no columns."""
    if path is None:
        root = stdlib_root()
        files = stdlib_files(root)
        if not files:
            raise ValueError(f"default corpus is empty: no .py files under {root} "
                             f"(outside {', '.join(sorted(STDLIB_SKIP_DIRS))})")
        source = Source("stdlib", root, files=tuple(files))
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise ValueError(f"corpus path {str(p)!r} does not exist")
        p = p.absolute()
        if p.is_dir() and (p / "dataset_dict.json").is_file():
            splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
            raise ValueError(f"{str(p)!r} is a DatasetDict (splits {splits}): point path at one split's "
                             f"folder, e.g. {str(p / (splits[0] if splits else 'train'))!r}")
        if p.is_dir() and is_saved_dataset(p):
            source = Source("saved", p, text_column)
        elif p.is_dir():
            files = _visible_files(p)
            if not files:
                raise ValueError(f"no text files in directory {str(p)!r}: looked for non-hidden files "
                                 f"whose first {SNIFF_BYTES} bytes contain no NUL byte")
            source = Source("directory", p, files=tuple(files))
        elif p.suffix.lower() in HF_FILE_SUFFIXES:
            source = Source(HF_FILE_SUFFIXES[p.suffix.lower()], p, text_column)
        else:
            source = Source("gzip" if p.suffix == ".gz" else "file", p)
    if not source.is_dataset and text_column != "text":
        raise ValueError(f"text_column={text_column!r} applies to Hugging Face data sets (a save_to_disk folder, "
                         f".parquet, .jsonl, .arrow); {source.description} is read as raw bytes")
    return source


# ---------------------------------------------------------------------------------------------
# building a cached corpus


def corpus_cache() -> Path:
    """Where built corpora live: `<hiertrans cache>/text` (`$HIERTRANS_CACHE` moves it)."""
    return cache_dir() / "text"


class CorpusWriter:
    """Streams documents into `directory/corpus.bin`, one `SEPARATOR` between consecutive non-empty
    documents, and each document's start offset into `directory/doc_starts.int64`. Memory stays
    bounded by the pieces it is handed, whatever the corpus size."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.stream = open(directory / CORPUS_FILE, "wb")
        self.index = open(directory / DOC_STARTS_FILE, "wb")
        self.size = self.documents = 0

    def add_document(self, pieces: Iterable[bytes]) -> int:
        """One document from its pieces (e.g. a file read in blocks); an empty one adds nothing.
        Returns the bytes written."""
        before = self.size
        for piece in pieces:
            if not piece:
                continue
            if self.size == before:  # the document's first byte: it is not empty
                if self.size:
                    self._write(SEPARATOR)
                self._index(np.array([self.size], dtype=np.int64))
            self._write(piece)
        return self.size - before

    def add_documents(self, data: np.ndarray, starts: np.ndarray) -> None:
        """Non-empty documents back to back in `data` (uint8), document k beginning at `starts[k]`
        (so `starts[0] == 0`): the separators go in with one vectorised insert."""
        if len(starts) == 0:
            return
        before = self.size
        gaps = starts if before else starts[1:]  # a separator in front of every document but the corpus' first
        # document k moves right by the k (or k + 1) separators in front of it
        self._index(before + starts + np.arange(len(starts)) + (1 if before else 0))
        self._write(np.insert(data, gaps, SEPARATOR[0]) if len(gaps) else data)

    def _index(self, starts: np.ndarray) -> None:
        self.index.write(starts.astype("<i8").tobytes())
        self.documents += len(starts)

    def _write(self, data: bytes | np.ndarray) -> None:
        self.stream.write(data)
        self.size += len(data)

    def close(self) -> None:
        self.stream.close()
        self.index.close()

    def finish(self, source: Source) -> None:
        """Close, and describe the corpus in `source.json`; `CorpusError` if nothing was written."""
        self.close()
        if self.size == 0:
            raise CorpusError(f"corpus is empty: {source.description} holds no bytes")
        info = {"source": source.description, "path": str(source.path), "kind": source.kind, "bytes": self.size,
                "documents": self.documents, "separator": SEPARATOR.decode(), "format": CACHE_FORMAT}
        (self.directory / SOURCE_FILE).write_text(json.dumps(info, indent=1) + "\n")


def progress_bar(source: Source, total: int | None, unit: str, show: bool):
    from tqdm.auto import tqdm

    name = "stdlib" if source.kind == "stdlib" else source.path.name
    return tqdm(total=total, unit=unit, unit_scale=True, desc=f"hiertrans: building corpus {name}",
                disable=not show, dynamic_ncols=True)


def _blocks(f) -> Iterator[bytes]:
    while block := f.read(COPY_BYTES):
        yield block


def _gunzipped_blocks(source: Source, raw, bar) -> Iterator[bytes]:
    """Decompressed blocks of the open gzip file `raw`; a damaged file is a `CorpusError` (and a
    failing write to the cache stays the OSError it is)."""
    unzipped = gzip.GzipFile(fileobj=raw)
    while True:
        try:
            block = unzipped.read(COPY_BYTES)
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise CorpusError(f"{source.path} is not a readable gzip file ({err}); to train on its bytes as "
                              "they are, rename it without the .gz suffix") from None
        if not block:
            return
        bar.update(raw.tell() - bar.n)  # progress in compressed bytes: the total is known
        yield block


def _build_from_files(source: Source, writer: CorpusWriter, show: bool) -> None:
    """Directory or stdlib: the files in sorted order, one document each."""
    files = list(source.files)
    if source.kind == "directory":
        candidates = [f for f in files if f.is_file()]
        files = [f for f in candidates if looks_like_text(f)]
        binary = [f.relative_to(source.path).as_posix() for f in candidates if f not in files]
        shown = ", ".join(binary[:5]) + (f" and {len(binary) - 5} more" if len(binary) > 5 else "")
        if not files:
            raise CorpusError(f"no text files in directory {str(source.path)!r}: every non-hidden file is binary "
                              f"(a NUL byte in its first {SNIFF_BYTES} bytes): {shown or 'none found'}; pass a "
                              f"directory of text files")
        if binary:
            warnings.warn(f"corpus directory {str(source.path)!r}: left out {len(binary)} binary files (a NUL byte "
                          f"in the first {SNIFF_BYTES} bytes): {shown}", stacklevel=2)
        for f in files:
            with open(f, "rb") as handle:
                warn_not_utf8(f, handle.read(SNIFF_BYTES))
    total = sum(f.stat().st_size for f in files)
    with progress_bar(source, total, "B", show and total >= PROGRESS_MIN_BYTES) as bar:
        for f in files:
            with open(f, "rb") as handle:
                bar.update(writer.add_document(_blocks(handle)))


def _build_from_gzip(source: Source, writer: CorpusWriter, show: bool) -> None:
    total = source.path.stat().st_size
    with open(source.path, "rb") as raw, progress_bar(source, total, "B", show and total >= PROGRESS_MIN_BYTES) as bar:
        blocks = _gunzipped_blocks(source, raw, bar)
        writer.add_document(blocks)


# kind -> builder; datamodules.hf_text adds the Hugging Face kinds (datamodules/__init__ imports it)
BUILDERS: dict[str, Callable[[Source, CorpusWriter, bool], None]] = {
    "stdlib": _build_from_files, "directory": _build_from_files, "gzip": _build_from_gzip}


def build_corpus(source: Source, directory: Path, show_progress: bool = True) -> None:
    """Write `source`'s byte stream and document index into the (empty) `directory`."""
    builder = BUILDERS[source.kind]
    writer = CorpusWriter(directory)
    try:
        builder(source, writer, show_progress)
    finally:
        writer.close()
    writer.finish(source)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an advisory lock on `lock_path` (released when the process ends, even when killed)."""
    with open(lock_path, "a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("hiertrans: waiting for another process to build %s", lock_path.name)
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError:  # no locks on this file system: builders race, the first rename wins
                pass
        yield


def build_once(entry: Path, build: Callable[[Path], None], leader: bool = True) -> None:
    """Make the cache directory `entry` with `build(tmp_dir)` unless it exists, once across processes.

    Processes asking at the same time take turns on a lock file: the first builds (into a temporary
    directory renamed into place), the others then find `entry` and return. A follower (`leader=False`,
    e.g. a rank other than zero) gives the leader a head start to take the lock. When the build fails
    with a `CorpusError`, the message is left beside the entry, and the processes that were waiting
    raise it too instead of rebuilding (a later run tries again).
    """
    if entry.is_dir():
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    asked = time.time()
    if not leader:
        while not entry.is_dir() and time.time() - asked < FOLLOWER_HEAD_START:
            time.sleep(0.05)
    error_file = entry.with_name(f".{entry.name}.error")
    with _exclusive(entry.with_name(f".{entry.name}.lock")):
        if entry.is_dir():
            return
        if error_file.is_file() and error_file.stat().st_mtime >= asked:  # the build we waited for failed
            raise CorpusError(error_file.read_text())
        try:
            with atomic_directory(entry) as tmp:
                if tmp is not None:
                    build(tmp)
        except CorpusError as err:
            with atomic_write(error_file, "w") as f:
                f.write(str(err))
            raise
        _prune(entry)


def _prune(entry: Path) -> None:
    """After building `entry`: delete the other builds of the same source (same `<name>-<source id>-`
    prefix) with every lock and error file of that source, the builds of sources that no longer exist
    (tests' temporary files, a deleted data set) and lock and error files older than an hour (failed
    builds leave them), so the cache holds one build per live source.

    Safe against concurrent users: a process that still waits on an unlinked lock finds `entry` and
    returns; a process still mapping a deleted build keeps its pages (an unlinked file lives until its
    last map is gone); temporary build directories (`.<entry>-tmp-*`) are never touched.
    """
    source_prefix = entry.name.rsplit("-", 1)[0]
    for other in entry.parent.iterdir():
        name = other.name.removeprefix(".").removesuffix(".lock").removesuffix(".error")
        if other == entry or name.rsplit("-", 1)[0] != source_prefix and not _is_leftover(other):
            continue
        if other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
        else:
            other.unlink(missing_ok=True)


def _is_leftover(path: Path) -> bool:
    """A build whose source is gone, or an old lock or error file."""
    if path.name.endswith((".lock", ".error")):
        with contextlib.suppress(OSError):
            return time.time() - path.stat().st_mtime > STALE_SECONDS
        return False
    try:
        recorded = json.loads((path / SOURCE_FILE).read_text())["path"]
    except (OSError, ValueError, KeyError):  # not a build (a lock, a temporary directory, datasets' files)
        return False
    return not Path(recorded).exists()


# ---------------------------------------------------------------------------------------------
# the public entry points


def load_corpus(path: str | os.PathLike | None = None, text_column: str = "text", allow_binary: bool = False) -> Tensor:
    """The corpus at `path` (see the module docstring; `None` = the stdlib): a read-only 1-D uint8
    tensor over a memory map, built into the cache first if the source needs it.

    Raises `ValueError` for a missing path, an empty corpus, or data that is not text (a single file
    that is binary or not UTF-8 is read as it is with `allow_binary=True`).
    """
    return open_source(find_source(path, text_column), allow_binary=allow_binary)


def open_source(source: Source, *, leader: bool = True, show_progress: bool = True,
                allow_binary: bool = False) -> Tensor:
    """`load_corpus` for a `Source`. `leader`: this process should build the cache if several ask
    at once (local rank zero); `show_progress`: draw a bar while building a large source (rank zero)."""
    if source.kind == "file":
        if source.path.stat().st_size == 0:
            raise CorpusError(f"corpus is empty: {source.description} holds no bytes")
        data = map_file(source.path)
    else:
        entry = cache_entry(source)
        build_once(entry, lambda tmp: build_corpus(source, tmp, show_progress), leader)
        data = map_file(entry / CORPUS_FILE)
    if source.kind in ("file", "gzip") and not allow_binary:  # checked on every open: the cache may predate it
        check_utf8(source.path, bytes(data[:SNIFF_BYTES].numpy()))
    return data


def cache_entry(source: Source) -> Path:
    """The cache directory that holds (or will hold) `source`'s built corpus."""
    return corpus_cache() / source.entry_name()


def document_starts(path: str | os.PathLike | None = None, text_column: str = "text",
                    allow_binary: bool = False) -> np.ndarray:
    """Where each document (file, or data-set row) starts in `load_corpus(path, text_column)`: an
    ascending int64 array, memory-mapped from the cache (`[0]` for a single file, mapped in place)."""
    source = find_source(path, text_column)
    open_source(source, allow_binary=allow_binary)
    if source.kind == "file":
        return np.zeros(1, dtype=np.int64)
    return np.memmap(cache_entry(source) / DOC_STARTS_FILE, dtype="<i8", mode="r")


def is_enwik8(path: str | os.PathLike | None, num_bytes: int) -> bool:
    """enwik8 is recognised by its exact size or by name, and then takes its standard split."""
    return num_bytes == ENWIK8_BYTES or (path is not None and "enwik8" in Path(path).name)


def split_sizes(num_bytes: int, val_fraction: float, test_fraction: float,
                enwik8: bool = False) -> tuple[int, int, int]:
    """(train, val, test) byte counts; val and test round down, train takes the rest."""
    if enwik8:  # 90M / 5M / 5M for the real file; the same proportions for a truncated copy
        val_fraction = test_fraction = 0.05
    n_val, n_test = int(num_bytes * val_fraction), int(num_bytes * test_fraction)
    return num_bytes - n_val - n_test, n_val, n_test
