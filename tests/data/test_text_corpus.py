"""Corpora of any size: memory-mapped bytes, the build cache, Hugging Face data sets from disk."""

import gzip
import json
import pickle
import re
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_LM_ARGS

from datamodules import ByteTextDataModule, corpus
from datamodules.corpus import (
    CORPUS_FILE,
    CorpusError,
    FileSlice,
    document_starts,
    find_source,
    load_corpus,
)
from datamodules.text import RandomCropDataset, WindowDataset

try:
    import datasets
except ImportError:  # a declared dependency; without it only the byte-corpus tests run
    datasets = None
needs_datasets = pytest.mark.skipif(datasets is None, reason="Hugging Face datasets is not installed")

DOCS = ["first document\nwith two lines", "", "second: héllo wörld", None, "third " * 40, "last"]
EXPECTED = "\n".join(d for d in DOCS if d).encode()  # empty and null rows are dropped


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Every test builds into its own cache directory (and no test writes to ~/.cache)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HIERTRANS_CACHE", str(cache))
    return cache / "text"


def write_jsonl(path: Path, docs=DOCS, column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def visible_entries(cache: Path) -> list[str]:
    if not cache.exists():
        return []
    return sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


# ---- byte corpora: memory maps


def test_a_file_is_mapped_in_place_read_only(tmp_path, isolated_cache):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"abc" * 1000)
    data = load_corpus(path)
    assert data.dtype == torch.uint8 and data.shape == (3000,) and bytes(data[:6].tolist()) == b"abcabc"
    assert load_corpus(path) is data  # one map per file and process
    assert not isolated_cache.exists()  # nothing copied into the cache
    ref = FileSlice.of(data[10:20])
    assert ref is not None and (ref.path, ref.start, ref.length) == (str(path.absolute()), 10, 10)


def test_datasets_pickle_a_reference_not_the_bytes(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    data = load_corpus(path, allow_binary=True)
    for dataset in (WindowDataset(data[1000:], 16), RandomCropDataset(data[:5000], 16, num_samples=8)):
        blob = pickle.dumps(dataset)
        assert len(blob) < 2000  # what a spawned loader worker receives: a file reference
        clone = pickle.loads(blob)
        assert torch.equal(clone.data, dataset.data) and torch.equal(clone[3], dataset[3])
    plain = WindowDataset(torch.arange(100, dtype=torch.uint8), 8)  # not mapped: pickled by value
    assert torch.equal(pickle.loads(pickle.dumps(plain)).data, plain.data)


def test_a_changed_file_is_not_served_from_a_stale_map(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"old contents")
    assert bytes(load_corpus(path).tolist()) == b"old contents"
    path.write_bytes(b"new contents, longer")
    assert bytes(load_corpus(path).tolist()) == b"new contents, longer"


def resident_file_kib() -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("RssFile:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from Linux's /proc")
def test_random_crops_keep_the_mapped_corpus_out_of_the_resident_set(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"0123456789abcdef" * (4 << 20))  # 64 MiB, in the page cache after the write
    data = load_corpus(path)
    before = resident_file_kib()
    data.sum()  # every page mapped into this process
    assert resident_file_kib() - before > 48 << 10
    corpus.release_pages(data[5:])  # any view of the map releases it
    assert resident_file_kib() - before < 8 << 10
    crops = RandomCropDataset(data, 256, num_samples=2000)
    samples = [crops[i] for i in range(2000)]  # released every few crops: not a page-cache folio per crop
    assert resident_file_kib() - before < 8 << 10
    assert bytes(samples[7][:4].tolist()) in (b"0123456789abcdef" * 2)


# ---- byte corpora: the build cache


def make_tree(root: Path) -> bytes:
    """A directory with nested, empty, hidden and binary files; returns the stream it must give."""
    (root / "b").mkdir(parents=True)
    (root / "a.py").write_bytes(b"aaa\n")
    (root / "b" / "c.md").write_bytes(b"ccc")
    (root / "b" / "empty.txt").write_bytes(b"")
    (root / "blob.bin").write_bytes(b"\x89PNG\0\0")
    (root / ".hidden").write_bytes(b"secret")
    (root / "z.txt").write_bytes("zé".encode() * 100)
    return b"aaa\n\nccc\n" + "zé".encode() * 100


def test_directory_becomes_one_cached_map_with_a_document_index(tmp_path, isolated_cache):
    expected = make_tree(tmp_path / "tree")
    data = load_corpus(tmp_path / "tree")
    assert bytes(data.tolist()) == expected
    (entry,) = visible_entries(isolated_cache)
    assert FileSlice.of(data).path == str(isolated_cache / entry / CORPUS_FILE)  # one map for all files
    starts = document_starts(tmp_path / "tree")
    assert starts.tolist() == [0, 5, 9]  # a.py, b/c.md, z.txt (the empty file is no document)
    info = json.loads((isolated_cache / entry / "source.json").read_text())
    assert (info["bytes"], info["documents"]) == (len(expected), 3)


def test_cache_hit_reads_no_source_file(tmp_path, monkeypatch):
    make_tree(tmp_path / "tree")
    first = bytes(load_corpus(tmp_path / "tree").tolist())
    corpus._MAPS.clear()  # a new process: only the cache on disk is left

    def no_build(*args):
        raise AssertionError("rebuilt although the cache exists")

    monkeypatch.setattr(corpus, "build_corpus", no_build)
    monkeypatch.setattr(corpus, "looks_like_text", no_build)
    assert bytes(load_corpus(tmp_path / "tree").tolist()) == first


def test_a_changed_directory_is_rebuilt_and_the_stale_build_removed(tmp_path, isolated_cache):
    expected = make_tree(tmp_path / "tree")
    load_corpus(tmp_path / "tree")
    before = visible_entries(isolated_cache)
    time.sleep(0.01)
    (tmp_path / "tree" / "a.py").write_bytes(b"AAAA\n")
    assert bytes(load_corpus(tmp_path / "tree").tolist()) == b"AAAA\n" + expected[4:]
    after = visible_entries(isolated_cache)
    assert len(after) == 1 and after != before
    assert [p.name for p in isolated_cache.iterdir()] == after  # no lock or error file left either


def test_builds_of_vanished_sources_are_pruned(tmp_path, isolated_cache):
    make_tree(tmp_path / "gone")
    load_corpus(tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone")
    make_tree(tmp_path / "kept")
    load_corpus(tmp_path / "kept")
    (entry,) = visible_entries(isolated_cache)
    assert entry.startswith("kept-")


def test_gzip_is_decompressed_once(tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt.gz"
    payload = "naïve text\n".encode() * 3000
    path.write_bytes(gzip.compress(payload))
    assert bytes(load_corpus(path).tolist()) == payload
    corpus._MAPS.clear()
    monkeypatch.setattr(corpus.gzip, "GzipFile", None)  # any decompression would fail now
    assert bytes(load_corpus(path).tolist()) == payload


def test_a_bad_gzip_file_names_itself(tmp_path):
    path = tmp_path / "notes.gz"
    path.write_bytes(b"plain text, not gzip")
    with pytest.raises(ValueError, match=r"notes.gz is not a readable gzip file .*rename it without the .gz"):
        load_corpus(path)


def test_an_interrupted_build_leaves_nothing(tmp_path, isolated_cache, monkeypatch):
    make_tree(tmp_path / "tree")

    def dies_half_way(f):  # after the first block of the first file
        yield f.read(2)
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus, "_blocks", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        load_corpus(tmp_path / "tree")
    assert visible_entries(isolated_cache) == []
    assert not any(p.is_dir() for p in isolated_cache.iterdir())  # no temporary directory either
    monkeypatch.undo()
    monkeypatch.setenv("HIERTRANS_CACHE", str(isolated_cache.parent))
    assert len(load_corpus(tmp_path / "tree")) == len(make_tree(tmp_path / "again"))


def slow_builds(monkeypatch, fail: bool = False) -> list[int]:
    """Count builds; each takes 0.3 s (and fails with a data error if `fail`)."""
    builds, real = [], corpus.build_corpus

    def build(source, directory, show_progress=True):
        builds.append(1)
        time.sleep(0.3)
        if fail:
            raise CorpusError(f"bad data in {source.path}")
        real(source, directory, show_progress)

    monkeypatch.setattr(corpus, "build_corpus", build)
    return builds


def run_concurrently(fn, n: int = 4) -> list:
    results = [None] * n

    def run(i):
        try:
            results[i] = fn(leader=i == 0)
        except Exception as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_loaders_build_once(tmp_path, monkeypatch):
    expected = make_tree(tmp_path / "tree")
    builds = slow_builds(monkeypatch)
    source = find_source(tmp_path / "tree")
    results = run_concurrently(lambda leader: corpus.open_source(source, leader=leader))
    assert len(builds) == 1
    assert all(bytes(r.tolist()) == expected for r in results)


def test_ranks_that_waited_raise_the_builders_error_without_rebuilding(tmp_path, monkeypatch):
    make_tree(tmp_path / "tree")
    builds = slow_builds(monkeypatch, fail=True)
    source = find_source(tmp_path / "tree")
    results = run_concurrently(lambda leader: corpus.open_source(source, leader=leader))
    assert len(builds) == 1
    assert all(isinstance(r, CorpusError) and "bad data in" in str(r) for r in results)
    with pytest.raises(CorpusError):  # a later run tries again
        load_corpus(tmp_path / "tree")
    assert len(builds) == 2


@needs_datasets
def test_progress_bar_while_building_a_large_source(tmp_path, monkeypatch, capsys):
    make_tree(tmp_path / "tree")
    monkeypatch.setattr(corpus, "PROGRESS_MIN_BYTES", 0)
    load_corpus(tmp_path / "tree")
    assert "building corpus tree" in capsys.readouterr().err
    corpus.open_source(find_source(write_jsonl(tmp_path / "d.jsonl")), show_progress=False)  # not rank zero
    assert "building corpus" not in capsys.readouterr().err


def test_start_up_with_the_cache_in_place_does_not_grow_with_size(tmp_path):
    def cached_load_seconds(size):
        root = tmp_path / f"tree{size}"
        root.mkdir()
        for i in range(4):
            (root / f"{i}.txt").write_bytes(b"x" * (size // 4))
        load_corpus(root)
        corpus._MAPS.clear()
        start = time.perf_counter()
        assert len(load_corpus(root)) == size + 3
        return time.perf_counter() - start

    small, large = cached_load_seconds(1 << 12), cached_load_seconds(64 << 20)
    assert large < 0.05 and large < 20 * small + 0.01


# ---- Hugging Face data sets


def save_dataset(path: Path, docs=DOCS, column: str = "text") -> Path:
    datasets.Dataset.from_dict({column: docs, "id": list(range(len(docs)))}).save_to_disk(str(path))
    return path


def write_parquet(path: Path, docs=DOCS) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path)
    return path


@needs_datasets
@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved", "arrow"])
def test_data_set_rows_join_into_one_utf8_stream(tmp_path, kind):
    path = {"jsonl": lambda: write_jsonl(tmp_path / "d.jsonl"),
            "parquet": lambda: write_parquet(tmp_path / "d.parquet"),
            "saved": lambda: save_dataset(tmp_path / "saved"),
            "arrow": lambda: next(save_dataset(tmp_path / "saved").glob("*.arrow"))}[kind]()
    assert bytes(load_corpus(path).tolist()) == EXPECTED
    starts = document_starts(path)
    docs = [d.encode() for d in DOCS if d]
    assert starts.tolist() == [sum(len(d) + 1 for d in docs[:k]) for k in range(len(docs))]


@needs_datasets
@pytest.mark.parametrize("arrow_type", ["string", "large_string", "string_view"])
def test_every_arrow_string_type(tmp_path, arrow_type):
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.array(DOCS, type=getattr(pa, arrow_type)())
    pq.write_table(pa.table({"text": column}), tmp_path / "d.parquet")
    assert bytes(load_corpus(tmp_path / "d.parquet").tolist()) == EXPECTED


@needs_datasets
def test_sliced_arrays_are_encoded_from_their_offset():
    import pyarrow as pa

    from datamodules.hf_text import utf8_blocks

    array = pa.array(["xx", "ab", "", None, "cde"]).slice(1)
    ((data, starts),) = list(utf8_blocks(array))
    assert bytes(data) == b"abcde" and starts.tolist() == [0, 2]


@needs_datasets
def test_data_set_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for path in (write_jsonl(tmp_path / "d.jsonl"), write_parquet(tmp_path / "d.parquet"),
                 save_dataset(tmp_path / "saved")):
        assert bytes(load_corpus(path).tolist()) == EXPECTED


@needs_datasets
def test_large_documents_are_encoded_in_bounded_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr("datamodules.hf_text.COPY_BYTES", 100)
    docs = [f"doc {i} " * (i % 7) for i in range(300)]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    assert bytes(load_corpus(path).tolist()) == "\n".join(d for d in docs if d).encode()


@needs_datasets
def test_text_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", column="content")
    assert bytes(load_corpus(path, text_column="content").tolist()) == EXPECTED
    dm = ByteTextDataModule(str(path), text_column="content", seq_len=8, batch_size=2)
    dm.setup("fit")
    assert dm.train_bytes + dm.val_bytes + dm.test_bytes == len(EXPECTED)
    assert next(iter(dm.train_dataloader())).shape == (2, 9)


@needs_datasets
def test_a_changed_data_set_is_re_encoded(tmp_path, isolated_cache):
    path = write_jsonl(tmp_path / "d.jsonl")
    load_corpus(path)
    time.sleep(0.01)
    write_jsonl(path, ["brand new"])
    assert bytes(load_corpus(path).tolist()) == b"brand new"
    assert len(visible_entries(isolated_cache)) == 1


@needs_datasets
@pytest.mark.parametrize("setup, match", [
    (lambda p: write_jsonl(p / "d.jsonl", column="body"),
     r"column 'text' not found in .*d.jsonl: its columns are \['body', 'id'\]; set --data.init_args.text_column"),
    (lambda p: save_dataset(p / "saved", column="body"),
     r"column 'text' not found in .*saved: its columns are \['body', 'id'\]"),
    (lambda p: write_jsonl(p / "d.jsonl", ["", None, ""]), r"data set .*d.jsonl is empty: column 'text' has no"),
    (lambda p: (p / "d.jsonl").write_bytes(b""), r"data set .*d.jsonl is empty"),
    (lambda p: (p / "d.jsonl").write_bytes(b'{"text": "caf\xe9"}\n'), r"d.jsonl is not UTF-8 text .*re-encode it"),
    (lambda p: (p / "d.jsonl").write_bytes(bytes(range(256)) * 4),
     r"cannot read .*d.jsonl \(.*\): a .jsonl file holds one JSON object per line, in UTF-8; to train on its raw"),
    (lambda p: (p / "d.parquet").write_bytes(b"PK\3\4 a zip, not parquet"), r"cannot read .*d.parquet .*Parquet"),
    (lambda p: (p / "d.jsonl").write_text('{"text": 1}\n'), r"column 'text' of .*d.jsonl holds int64 values, not text"),
])
def test_data_set_errors_are_one_line_and_name_the_file(tmp_path, setup, match):
    setup(tmp_path)
    (path,) = [p for p in tmp_path.iterdir() if p.name != "cache"]
    with pytest.raises(ValueError, match=match) as info:
        load_corpus(path)
    assert "\n" not in str(info.value)


@needs_datasets
def test_dataset_dict_folder_asks_for_a_split(tmp_path):
    split = datasets.Dataset.from_dict({"text": ["a", "b"]})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=re.escape("is a DatasetDict (splits ['train', 'test']): point path at "
                                                   "one split's folder")):
        load_corpus(tmp_path / "dd")


def test_text_column_on_a_byte_corpus_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="text_column='body' applies to Hugging Face data sets"):
        load_corpus(tmp_path / "a.txt", text_column="body")
    with pytest.raises(ValueError, match="text_column must be a non-empty"):
        ByteTextDataModule(text_column="")


@needs_datasets
def test_loader_workers_share_the_map(tmp_path):
    """Forked workers read the parent's map; batches equal the in-process ones."""
    path = write_jsonl(tmp_path / "d.jsonl", [f"document {i} " * 20 for i in range(200)])
    dm = ByteTextDataModule(str(path), seq_len=16, batch_size=4, num_workers=2, val_fraction=0.1)
    dm.setup("fit")
    assert torch.equal(torch.cat(list(dm.val_dataloader())), torch.stack([dm.val_set[i] for i in
                                                                          range(len(dm.val_set))]))
    assert np.array_equal(dm.data[:10].numpy(), np.frombuffer(b"document 0", np.uint8))


# ---- the CLI (subprocesses, a few seconds each)

TINY = [*TINY_LM_ARGS, "--model.init_args.sample_length=8", "--data.init_args.batch_size=4",
        "--data.init_args.val_fraction=0.1", "--data.init_args.test_fraction=0.1", "--trainer.max_steps=2",
        "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]


def cli_fit(run_cli, monkeypatch, cache: Path, *args: str):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    proc = run_cli("fit", "--config", "lm.yaml", *TINY, *args)
    assert len(visible_entries(cache)) >= 1  # the data set was encoded into hiertrans' cache
    return proc


@needs_datasets
@pytest.mark.slow
def test_cli_trains_on_a_jsonl_file(run_cli, tmp_path, monkeypatch, isolated_cache):
    docs = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(300)]
    path = write_jsonl(tmp_path / "docs.jsonl", docs, column="body")
    cli_fit(run_cli, monkeypatch, isolated_cache, f"--data.init_args.path={path}",
            "--data.init_args.text_column=body")
    assert list((tmp_path / "runs").rglob("last.ckpt"))


@needs_datasets
@pytest.mark.slow
def test_cli_trains_on_a_save_to_disk_folder(run_cli, tmp_path, monkeypatch, isolated_cache):
    path = save_dataset(tmp_path / "saved", [f"row {i}: pack my box with five dozen jugs" for i in range(300)])
    cli_fit(run_cli, monkeypatch, isolated_cache, f"--data.init_args.path={path}")
    assert list((tmp_path / "runs").rglob("last.ckpt"))


@needs_datasets
@pytest.mark.slow
def test_cli_names_a_missing_column_in_one_line(run_cli, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "docs.jsonl", column="body")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    proc = run_cli("fit", "--config", "lm.yaml", f"--data.init_args.path={path}", check=False)
    assert proc.returncode == 2
    assert re.search(r"hiertrans: error: .*column 'text' not found in .*docs.jsonl: its columns are "
                     r"\['body', 'id'\]", proc.stderr)


def test_text_that_is_not_utf8_is_named_with_what_to_do(tmp_path):
    """A single file that does not start as UTF-8 text is refused by name with what to do, unless
    allow_binary (then read byte for byte); in a directory, binary files are left out by name, text in
    another encoding is named in a warning, and empty files add nothing."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café crème\n".encode("latin-1") * 50)
    with pytest.raises(ValueError, match=r"latin1.txt' is not UTF-8: byte 0xe9 at offset 3 .*iconv .*allow_binary"):
        load_corpus(latin1)
    assert bytes(load_corpus(latin1, allow_binary=True).tolist()) == latin1.read_bytes()
    blob = tmp_path / "weights.gz"
    blob.write_bytes(gzip.compress(b"\x93NUMPY\x01\x00" + bytes(100)))
    with pytest.raises(ValueError, match=r"weights.gz' is binary: a NUL byte at offset 7 .*pass text files"):
        load_corpus(blob)
    assert load_corpus(blob, allow_binary=True).shape == (108,)
    with pytest.raises(ValueError, match="is binary"):  # the cache built above does not bypass the check
        load_corpus(blob)
    cut = tmp_path / "cut.txt"  # a multi-byte character cut by the 8 KiB sniff is still text
    cut.write_bytes(b"x" * (8192 - 1) + "é".encode() + b"tail")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_corpus(cut)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("alpha")
    (tree / "empty.txt").write_text("")
    (tree / "model.bin").write_bytes(b"\0\1\2" * 10)
    with pytest.warns(UserWarning, match=r"left out 1 binary files .*model.bin"):
        assert bytes(load_corpus(tree).tolist()) == b"alpha"  # the empty document adds no separator
