"""Hugging Face `datasets` from local disk -> one UTF-8 byte stream (see `datamodules.corpus`).

Sources: a folder written by `Dataset.save_to_disk` and `.arrow` files are memory-mapped by
datasets (`load_from_disk`, `Dataset.from_file`); `.parquet` and `.jsonl` files are streamed by
datasets' local readers (those behind `Dataset.from_parquet` / `from_json`, in streaming mode), so
nothing is copied into Hugging Face's own cache and nothing asks the network. Only the text column
is read. Arrow keeps strings as UTF-8 already: a document's bytes go to disk as they are, after a
full UTF-8 validation, with the separators put in by one vectorised insert per block of documents.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from .corpus import (
    BUILDERS,
    COPY_BYTES,
    HF_FILE_SUFFIXES,
    PROGRESS_MIN_BYTES,
    CorpusError,
    CorpusWriter,
    Source,
    corpus_cache,
    progress_bar,
)

ROWS_PER_BATCH = 1024  # rows datasets hands over at a time; blocks are cut to <= COPY_BYTES anyway

READ_HINTS = {
    "json": "a .jsonl file holds one JSON object per line, in UTF-8; to train on its raw bytes instead, give it "
            "another suffix (e.g. .txt)",
    "parquet": "expected an Apache Parquet file; to train on its raw bytes instead, give it another suffix",
    "arrow": "expected an Arrow stream as datasets writes it (Dataset.save_to_disk, Dataset.from_file)",
    "saved": "expected a folder written by Dataset.save_to_disk",
}


@contextlib.contextmanager
def _reading(source: Source) -> Iterator[None]:
    """datasets' and pyarrow's reading errors, whatever their class, as one `CorpusError` line that names
    the file and says what was expected (datasets' own ERROR log line is silenced meanwhile)."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    except CorpusError:
        raise
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorpusError(f"cannot read {source.path} ({reason}): {READ_HINTS[source.kind]}") from None
    finally:
        datasets.logging.set_verbosity(level)


def _open(source: Source):
    """A datasets `Dataset` (memory-mapped) or `IterableDataset` (streamed) over the source.

    JSON Lines and Parquet go through the readers behind `Dataset.from_json` / `from_parquet` in
    streaming mode, not through `load_dataset`: that one sends a download-count request to the Hub
    first (without HF_DATASETS_OFFLINE=1), which an offline cluster node answers with a timeout.
    """
    import datasets

    if source.kind == "saved":
        return datasets.load_from_disk(str(source.path))
    if source.kind == "arrow":
        return datasets.Dataset.from_file(str(source.path))
    from datasets.io.json import JsonDatasetReader
    from datasets.io.parquet import ParquetDatasetReader

    reader = {"json": JsonDatasetReader, "parquet": ParquetDatasetReader}[source.kind]
    # cache_dir: datasets' lock files land in hiertrans' cache, not in ~/.cache/huggingface
    return reader(str(source.path), streaming=True, cache_dir=str(corpus_cache().parent / "datasets")).read()


def _row_count(source: Source, dataset) -> int | None:
    """Rows to expect (for the progress bar), when known without reading the data."""
    if getattr(dataset, "num_rows", None) is not None:
        return dataset.num_rows
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(source.path).num_rows
    return None  # JSON Lines: unknown until read


def _source_bytes(source: Source) -> int:
    if source.path.is_dir():
        return sum(f.stat().st_size for f in source.path.iterdir() if f.is_file())
    return source.path.stat().st_size


def _missing_column(source: Source, columns: list[str]) -> CorpusError:
    return CorpusError(f"column {source.text_column!r} not found in {source.path}: its columns are {columns}; "
                       "set --data.init_args.text_column to the one that holds the text")


def _check_text_type(source: Source, kind) -> None:
    import pyarrow as pa

    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return
    what = "binary data" if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) else f"{kind} values"
    raise CorpusError(f"column {source.text_column!r} of {source.path} holds {what}, not text: set "
                      "--data.init_args.text_column to a string column")


def _text_arrays(source: Source, dataset) -> Iterator:
    """The text column as pyarrow string arrays, in row order (only that column is read)."""
    columns = dataset.column_names  # None for a stream whose schema is only known once read
    if columns is not None:
        if source.text_column not in columns:
            raise _missing_column(source, columns)
        dataset = dataset.select_columns([source.text_column])
    with _reading(source):
        tables = iter(dataset.with_format("arrow").iter(batch_size=ROWS_PER_BATCH))
    while True:
        with _reading(source):
            table = next(tables, None)
        if table is None:
            return
        if source.text_column not in table.column_names:
            raise _missing_column(source, table.column_names)
        column = table.column(source.text_column)
        _check_text_type(source, column.type)
        yield from column.chunks


def utf8_blocks(array, max_bytes: int = COPY_BYTES) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`(data, starts)` blocks of a pyarrow string array: the UTF-8 bytes of its non-empty strings
    back to back (a zero-copy view of Arrow's buffer) and where each begins, `<= max_bytes` per block
    unless one string is longer. Nulls count as empty. `ArrowInvalid` if a string is not UTF-8."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_string_view(array.type):
        array = array.cast(pa.large_string())
    if array.null_count:
        array = pc.fill_null(array, "")
    array.validate(full=True)  # checks every string is valid UTF-8
    _, offsets_buffer, data_buffer = array.buffers()
    offset_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[array.offset : array.offset + len(array) + 1]
    offsets = offsets.astype(np.int64)
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    first, n = 0, len(array)
    while first < n:
        # rows [first, last): as many as fit in max_bytes, at least one
        last = int(np.searchsorted(offsets, offsets[first] + max_bytes, side="right")) - 1
        last = min(max(last, first + 1), n)
        block = offsets[first : last + 1]
        lengths = np.diff(block)
        starts = (block[:-1] - block[0])[lengths > 0]
        yield data[block[0] : block[-1]], starts
        first = last


def build_from_dataset(source: Source, writer: CorpusWriter, show: bool) -> None:
    """Write the source's non-empty documents (rows of `text_column`) through `writer`."""
    try:
        import datasets  # noqa: F401 - checked here, used by the helpers
        import pyarrow as pa
    except ImportError:
        raise CorpusError(f"reading {source.path} needs Hugging Face datasets: pip install datasets") from None
    size = _source_bytes(source)
    if size == 0:
        raise CorpusError(f"data set {source.path} is empty (0 bytes)")
    with _reading(source):
        dataset = _open(source)
        total = _row_count(source, dataset)
    rows = documents = 0
    with progress_bar(source, total, " docs", show and size >= PROGRESS_MIN_BYTES) as bar:
        for array in _text_arrays(source, dataset):
            try:
                for data, starts in utf8_blocks(array):
                    writer.add_documents(data, starts)
                    documents += len(starts)
            except pa.ArrowInvalid as err:
                raise CorpusError(f"{source.path} is not UTF-8 text (column {source.text_column!r}, near row "
                                  f"{rows}: {err}); re-encode it as UTF-8") from None
            rows += len(array)
            bar.update(len(array))
    if documents == 0:
        raise CorpusError(f"data set {source.path} is empty: column {source.text_column!r} has no non-empty "
                          f"text in its {rows} rows")


BUILDERS.update(dict.fromkeys(("saved", *HF_FILE_SUFFIXES.values()), build_from_dataset))
