"""Byte-level text corpora for the hierarchical language model.

The corpus is one `torch.uint8` tensor over a read-only memory map (`datamodules.corpus`: sources,
caching, why); the vocabulary is the 256 byte values. It is split by position into
train | val | test (never by sampling files, which would leak near-duplicate files across splits).
Training draws random crops; validation and test walk their split once, in order, so their loss
is the exact figure over every byte. The datasets hold views of the map and pickle by reference,
so DDP ranks and loader workers (fork, spawn or forkserver) share one copy in the page cache.

Corpus sources (`path`, with `text_column` for Hugging Face data sets):
- `None`: the Python standard library's own source (every `.py` file, sorted, no installed packages).
- a file: its bytes, as they are; a `.gz` file is decompressed (once, into the cache). enwik8
  (exactly 100,000,000 bytes, or a name containing "enwik8") takes the standard 90/5/5 split.
  A file that does not start as UTF-8 text (binary, another encoding) is an error naming it,
  unless `allow_binary=True`.
- a directory: every non-hidden file below it that looks like text, in sorted order.
- a `Dataset.save_to_disk` folder, or a `.parquet`, `.jsonl` or `.arrow` file: the rows of
  `text_column`, UTF-8.

Files (and data-set rows) are joined with one newline between consecutive non-empty ones (a
visible boundary that costs one byte); empty ones contribute nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .corpus import (
    ENWIK8_BYTES,
    SNIFF_BYTES,
    STDLIB_SKIP_DIRS,
    CorpusError,
    document_starts,
    find_source,
    is_enwik8,
    load_corpus,
    open_source,
    pickle_state,
    release_pages,
    split_sizes,
    stdlib_files,
    text_files,
    unpickle_state,
)
from .samplers import EpochSampler, ShardSampler, mix, resumable_sampler

# the corpus API lived here before datamodules.corpus: importers of datamodules.text keep working
__all__ = ["ENWIK8_BYTES", "SNIFF_BYTES", "STDLIB_SKIP_DIRS", "ByteTextDataModule", "CorpusError", "EpochSampler",
           "RandomCropDataset", "ShardSampler", "WindowDataset", "document_starts", "is_enwik8", "load_corpus",
           "split_sizes", "stdlib_files", "text_files"]

# ---------------------------------------------------------------------------------------------
# datasets and samplers

RELEASE_EVERY = 16  # crops between two `release_pages`: at most 16 page-cache folios mapped per process


class RandomCropDataset(Dataset):
    """`num_samples` random crops of `seq_len + 1` bytes per epoch from `data`, as long tensors.

    Crop i of epoch e is a pure function of (seed, e, i): the epoch's offsets come from a generator
    seeded by (seed, e). Index with `(epoch, i)` (what `EpochSampler` yields, so the epoch travels
    with the index into worker processes) or with a plain `i`, which uses `self.epoch`.
    """

    def __init__(self, data: Tensor, seq_len: int, num_samples: int, seed: int = 0):
        if len(data) < seq_len + 1:
            raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} bytes to crop, got {len(data)}")
        self.data, self.seq_len, self.num_samples, self.seed = data, seq_len, num_samples, seed
        self.epoch = 0
        self._offsets: tuple[int, Tensor] | None = None  # (epoch, offsets) of the last epoch asked for
        self._crops_since_release = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # a mapped corpus travels to spawned workers as a file reference, not as its bytes
    def __getstate__(self) -> dict:
        return pickle_state(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(unpickle_state(state))

    def offsets(self, epoch: int) -> Tensor:
        """Start positions of the epoch's crops (computed once per epoch and process)."""
        if self._offsets is None or self._offsets[0] != epoch:
            g = torch.Generator().manual_seed(mix(self.seed, epoch))
            high = len(self.data) - self.seq_len  # last start whose crop still fits
            self._offsets = (epoch, torch.randint(high, (self.num_samples,), generator=g))
        return self._offsets[1]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int | tuple[int, int]) -> Tensor:
        epoch, i = index if isinstance(index, tuple) else (self.epoch, index)
        start = int(self.offsets(epoch)[i])
        crop = self.data[start : start + self.seq_len + 1].long()
        self._crops_since_release += 1
        if self._crops_since_release == RELEASE_EVERY:  # keep the mapped pages resident here bounded
            release_pages(self.data)
            self._crops_since_release = 0
        return crop


class WindowDataset(Dataset):
    """Consecutive windows of `seq_len + 1` bytes with stride `seq_len` over `data`, as long tensors.

    Windows overlap by one byte, so every byte after the first is a target exactly once; the last
    window is right-padded with `pad_id` (after every real byte, so causality keeps it harmless).
    """

    def __init__(self, data: Tensor, seq_len: int, pad_id: int = -1):
        self.data, self.seq_len, self.pad_id = data, seq_len, pad_id

    def __getstate__(self) -> dict:
        return pickle_state(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(unpickle_state(state))

    def __len__(self) -> int:
        return max(0, -(-(len(self.data) - 1) // self.seq_len))  # ceil((n - 1) / seq_len)

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = index * self.seq_len
        window = self.data[start : start + self.seq_len + 1].long()
        if len(window) < self.seq_len + 1:
            window = torch.cat([window, window.new_full((self.seq_len + 1 - len(window),), self.pad_id)])
        return window


# ---------------------------------------------------------------------------------------------
# the datamodule


class ByteTextDataModule(LightningDataModule):
    """Byte-level text for language modelling: batches of `(batch_size, seq_len + 1)` long tensors.

    Train: `train_samples_per_epoch` random crops per epoch (in total, over all ranks), different
    every epoch and reproducible from (seed, epoch). Val/test: their whole split once, in order, in
    windows padded with `pad_id` at the very end. Predict: the UTF-8 bytes of `prompt`, batch size 1.

    The predict-time sampling options live here, not in the model: `predict_length` bytes are sampled
    after the prompt at `predict_temperature` (0: greedy) among the `predict_top_k` likeliest bytes
    (None: all), then within the nucleus `predict_top_p` (None: no nucleus); `predict_options` hands
    them to the task. Given on the command line (`--data.init_args.predict_temperature 0`), they hold
    for a checkpoint whose saved model hyperparameters (which LightningCLI re-applies over the
    model's) say otherwise. (Prefixed: Lightning refuses a data hyperparameter named like a
    different-valued one of the model, such as the validation sample's `temperature`.)
    See the module docstring for what `path` may be; `text_column` names the column of a Hugging
    Face data set that holds the text; `allow_binary` reads a single file that is binary or not
    UTF-8 as it is instead of refusing it. `data` is the whole corpus, `(num_bytes,)` uint8, read-only.
    """

    vocab_size: int = 256

    def __init__(
        self,
        path: str | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        train_samples_per_epoch: int = 4096,
        num_workers: int = 0,
        seed: int = 0,
        prompt: str = "def ",
        pad_id: int = -1,
        text_column: str = "text",
        predict_length: int = 256,
        predict_temperature: float = 0.8,
        predict_top_k: int | None = 25,
        predict_top_p: float | None = None,
        allow_binary: bool = False,
    ):
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        for name, value in (("batch_size", batch_size), ("train_samples_per_epoch", train_samples_per_epoch)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction = {val_fraction} + {test_fraction} must be < 1 "
                             "to leave bytes to train on")
        if 0 <= pad_id < self.vocab_size:
            raise ValueError(f"pad_id={pad_id} is a byte value; use an index no byte takes, e.g. -1")
        if not prompt:
            raise ValueError("prompt must be a non-empty string (generation needs at least one byte)")
        if not isinstance(text_column, str) or not text_column:
            raise ValueError(f"text_column must be a non-empty column name, got {text_column!r}")
        if not isinstance(predict_length, int) or isinstance(predict_length, bool) or predict_length < 0:
            raise ValueError(f"predict_length must be an int >= 0 (bytes sampled after the prompt), got "
                             f"{predict_length!r}")
        temperature, top_k, top_p = predict_temperature, predict_top_k, predict_top_p
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
            raise ValueError(f"predict_temperature must be a number >= 0 (0: greedy), got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise ValueError(f"predict_top_k must be None (all bytes) or an int >= 1, got {top_k!r}")
        if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"predict_top_p must be None (no nucleus) or in (0, 1], got {top_p!r}")
        self.save_hyperparameters()
        self.path, self.seq_len, self.batch_size = path, seq_len, batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.train_samples_per_epoch, self.num_workers, self.seed = train_samples_per_epoch, num_workers, seed
        self.prompt, self.pad_id, self.text_column = prompt, pad_id, text_column
        self.allow_binary = allow_binary
        self.predict_length, self.temperature, self.top_k, self.top_p = predict_length, temperature, top_k, top_p
        self.data: Tensor | None = None
        self.train_bytes = self.val_bytes = self.test_bytes = 0

    @staticmethod
    def encode(text: str) -> Tensor:
        """UTF-8 bytes of `text` as a long tensor."""
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    @staticmethod
    def decode(ids: Tensor | Sequence[int]) -> str:
        """Bytes -> text (UTF-8, invalid sequences replaced); negative ids (padding) are dropped."""
        values = torch.as_tensor(ids).flatten().tolist()
        return bytes(v for v in values if v >= 0).decode("utf-8", errors="replace")

    def setup(self, stage: str | None = None) -> None:
        """Load and split the corpus (once); raises `ValueError` if any split is too short."""
        if self.data is not None:
            return
        source = find_source(self.path, self.text_column)
        # one process per machine builds a cache (others wait for it); only global rank zero draws its progress
        local_rank, global_rank = (getattr(self.trainer, name, 0) for name in ("local_rank", "global_rank"))
        data = open_source(source, leader=local_rank == 0, show_progress=global_rank == 0,
                           allow_binary=self.allow_binary)
        enwik8 = is_enwik8(self.path, len(data))
        n_train, n_val, n_test = split_sizes(len(data), self.val_fraction, self.test_fraction, enwik8)
        need = self.seq_len + 1
        for name, size, fraction in (("train", n_train, None), ("val", n_val, self.val_fraction),
                                     ("test", n_test, self.test_fraction)):
            if fraction == 0 and not enwik8:
                continue  # a split asked to be empty stays empty (its dataloader yields nothing)
            if size < need:
                hint = "smaller val/test fractions" if name == "train" else f"a larger {name}_fraction"
                raise ValueError(f"{name} split of {source.description} has {size} bytes but seq_len="
                                 f"{self.seq_len} needs at least {need}: use a smaller seq_len or {hint}")
        self.data = data
        self.train_bytes, self.val_bytes, self.test_bytes = n_train, n_val, n_test
        # views of the one corpus tensor, by position: train | val | test
        train, val, test = data[:n_train], data[n_train : n_train + n_val], data[n_train + n_val :]
        self.train_set = RandomCropDataset(train, self.seq_len, self.train_samples_per_epoch, self.seed)
        self.val_set = WindowDataset(val, self.seq_len, self.pad_id)
        self.test_set = WindowDataset(test, self.seq_len, self.pad_id)
        rank_zero_info(
            f"ByteTextDataModule: {len(data):,} bytes from {source.description}"
            f"{' (enwik8 split)' if enwik8 else ''}: train {n_train:,} | val {n_val:,} ({len(self.val_set)} "
            f"windows) | test {n_test:,} ({len(self.test_set)} windows), seq_len={self.seq_len}"
        )

    def _loader(self, dataset: Dataset, sampler: Sampler, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size or self.batch_size, sampler=sampler, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def _require_setup(self) -> None:
        if self.data is None:
            raise RuntimeError("ByteTextDataModule: call setup() before asking for a dataloader")

    def train_dataloader(self) -> DataLoader:
        """The epoch's crops in order (they are random per epoch already), sharded over ranks and
        resumable mid-epoch (`resumable_sampler`)."""
        self._require_setup()
        return self._loader(self.train_set, resumable_sampler(self.train_set, self.trainer, self.batch_size,
                                                              shuffle=False))

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.val_set, ShardSampler(self.val_set))

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.test_set, ShardSampler(self.test_set))

    def predict_dataloader(self) -> DataLoader:
        return DataLoader([self.encode(self.prompt)], batch_size=1)

    @property
    def predict_options(self) -> dict:
        """What predict samples after each prompt: `{"length", "temperature", "top_k", "top_p"}` (see the class)."""
        return dict(length=self.predict_length, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
