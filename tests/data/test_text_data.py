"""ByteTextDataModule: corpus sources, positional splits, exact val coverage, train crops, DDP shards."""

import gzip
import pickle
import re
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.trainer.states import RunningStage

from datamodules.samplers import EpochShuffleSampler
from datamodules.text import (
    STDLIB_SKIP_DIRS,
    ByteTextDataModule,
    EpochSampler,
    ShardSampler,
    WindowDataset,
    load_corpus,
    split_sizes,
    stdlib_files,
    text_files,
)

CORPUS = bytes(range(256)) * 8 + "héllo wörld\n".encode() * 50  # every byte value (allow_binary), some UTF-8


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_bytes(CORPUS)
    return path


def make_dm(path, **kwargs) -> ByteTextDataModule:
    dm = ByteTextDataModule(str(path), **{"seq_len": 16, "batch_size": 4, "allow_binary": True, **kwargs})
    dm.setup("fit")
    return dm


# ---- default corpus (read from disk once per session; later loads hit the in-process cache)


@pytest.fixture(scope="module")
def stdlib_corpus() -> torch.Tensor:
    return load_corpus(None)


def test_default_corpus_files_exclude_installed_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    rels = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 100 and all(r.endswith(".py") for r in rels)
    assert rels == sorted(rels) and rels == [f.relative_to(root).as_posix() for f in stdlib_files()]
    assert not any(STDLIB_SKIP_DIRS & set(r.split("/")) for r in rels)
    installed = next((root / "site-packages").rglob("*.py"), None)
    if installed is not None:  # the exclusion is exercised where site-packages sits under the stdlib
        assert installed not in set(files)


def test_default_corpus_is_the_sorted_stdlib_deterministically(stdlib_corpus):
    files = stdlib_files()
    sizes = [f.stat().st_size for f in files]
    nonempty = [f for f, s in zip(files, sizes) if s]
    # non-empty files joined by one newline: the length pins the byte count, the prefix the order
    assert stdlib_corpus.dtype == torch.uint8
    assert len(stdlib_corpus) == sum(sizes) + len(nonempty) - 1
    prefix = b"\n".join(f.read_bytes() for f in nonempty[:20])
    assert bytes(stdlib_corpus[: len(prefix)].tolist()) == prefix
    assert load_corpus(None) is stdlib_corpus  # cached in-process


def test_default_datamodule(stdlib_corpus):
    dm = ByteTextDataModule()
    dm.setup("fit")
    assert dm.data is stdlib_corpus and dm.vocab_size == 256
    assert dm.train_bytes + dm.val_bytes + dm.test_bytes == len(stdlib_corpus)
    assert dm.val_bytes == dm.test_bytes == int(0.05 * len(stdlib_corpus))
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (16, 257) and batch.dtype == torch.long


# ---- sources


def test_text_file_bytes_as_they_are(text_file):
    dm = make_dm(text_file)
    assert bytes(dm.data.tolist()) == CORPUS


def test_gzip_file_is_decompressed(tmp_path):
    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(gzip.compress(CORPUS))
    dm = make_dm(path)
    assert bytes(dm.data.tolist()) == CORPUS
    assert (dm.train_bytes, dm.val_bytes) == split_sizes(len(CORPUS), 0.05, 0.05)[:2]


def test_enwik8_takes_the_standard_split(tmp_path):
    assert split_sizes(100_000_000, 0.2, 0.0, enwik8=True) == (90_000_000, 5_000_000, 5_000_000)
    path = tmp_path / "enwik8_head.gz"  # recognised by name: the fractions are ignored
    path.write_bytes(gzip.compress(CORPUS[:2000]))
    dm = make_dm(path, val_fraction=0.3, test_fraction=0.0)
    assert (dm.train_bytes, dm.val_bytes, dm.test_bytes) == (1800, 100, 100)


def test_directory_takes_visible_text_files_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "z.txt").write_bytes(b"zzz")
    (tmp_path / "a.py").write_bytes(b"aaa\n")
    (tmp_path / "b" / "c.md").write_bytes(b"ccc")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\0\0\0")  # binary: has a NUL byte
    (tmp_path / ".hidden").write_bytes(b"secret")
    (tmp_path / ".git" / "config").write_bytes(b"secret")
    (tmp_path / "tail.txt").write_bytes(b"x" * 200)
    names = [f.relative_to(tmp_path).as_posix() for f in text_files(tmp_path)]
    assert names == ["a.py", "b/c.md", "b/z.txt", "empty.txt", "tail.txt"]
    dm = make_dm(tmp_path, seq_len=4, val_fraction=0.1, test_fraction=0.1)
    assert bytes(dm.data.tolist()) == b"aaa\n\nccc\nzzz\n" + b"x" * 200


# ---- splits and evaluation windows


def test_split_by_position(text_file):
    dm = make_dm(text_file, val_fraction=0.1, test_fraction=0.2)
    n = len(CORPUS)
    assert (dm.val_bytes, dm.test_bytes) == (int(0.1 * n), int(0.2 * n))
    assert dm.train_bytes == n - dm.val_bytes - dm.test_bytes
    assert torch.equal(dm.train_set.data, dm.data[: dm.train_bytes])
    assert torch.equal(dm.val_set.data, dm.data[dm.train_bytes : dm.train_bytes + dm.val_bytes])
    assert torch.equal(dm.test_set.data, dm.data[dm.train_bytes + dm.val_bytes :])


@pytest.mark.parametrize("length, seq_len", [(33, 8), (34, 8), (40, 8), (9, 8), (50, 1), (100, 7)])
def test_windows_predict_every_byte_once(length, seq_len):
    split = torch.randint(256, (length,), generator=torch.Generator().manual_seed(length)).to(torch.uint8)
    ds = WindowDataset(split, seq_len, pad_id=-1)
    windows = torch.stack([ds[i] for i in range(len(ds))])
    assert windows.shape == (-(-(length - 1) // seq_len), seq_len + 1) and windows.dtype == torch.long
    # window k starts where window k - 1's targets end: one byte of overlap
    assert torch.equal(windows[1:, 0], windows[:-1, -1])
    targets = windows[:, 1:].flatten()
    assert torch.equal(targets[targets != -1], split[1:].long())  # every byte after the first, once
    pad = windows.numel() - len(ds) - (length - 1)
    assert (windows == -1).sum() == pad and (pad == 0 or (windows[-1, -pad:] == -1).all())
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_val_and_test_loaders_walk_their_split_in_order(text_file):
    dm = make_dm(text_file, seq_len=10, val_fraction=0.1, test_fraction=0.1)
    for loader, split in ((dm.val_dataloader(), dm.val_set.data), (dm.test_dataloader(), dm.test_set.data)):
        targets = torch.cat([batch[:, 1:].flatten() for batch in loader])
        assert torch.equal(targets[targets != -1], split[1:].long())


def test_zero_fraction_gives_an_empty_split(text_file):
    dm = make_dm(text_file, test_fraction=0.0)
    assert dm.test_bytes == 0 and len(dm.test_dataloader()) == 0


# ---- train crops


def test_train_crops_shape_range_and_position(text_file):
    dm = make_dm(text_file, seq_len=16, train_samples_per_epoch=64)
    ds, train = dm.train_set, dm.train_set.data
    for i, start in enumerate(ds.offsets(0).tolist()):
        crop = ds[(0, i)]
        assert crop.shape == (17,) and crop.dtype == torch.long
        assert 0 <= start <= dm.train_bytes - 17  # never reaches into val
        assert torch.equal(crop, train[start : start + 17].long())


def test_train_crops_depend_on_seed_and_epoch_only(text_file):
    a, b = make_dm(text_file, seed=1).train_set, make_dm(text_file, seed=1).train_set
    c = make_dm(text_file, seed=2).train_set

    def crops(ds, epoch):
        return torch.stack([ds[(epoch, i)] for i in range(len(ds))])

    assert torch.equal(crops(a, 3), crops(b, 3))
    assert not torch.equal(crops(a, 0), crops(a, 1))
    assert not torch.equal(crops(a, 0), crops(c, 0))
    b.set_epoch(3)  # a plain index uses the dataset's epoch
    assert torch.equal(b[5], a[(3, 5)])


def test_epoch_sampler_carries_the_epoch(text_file):
    sampler = EpochSampler(3)
    sampler.set_epoch(2)
    assert list(sampler) == [(2, 0), (2, 1), (2, 2)] and len(sampler) == 3
    dm = make_dm(text_file)
    dm.trainer = SimpleNamespace(current_epoch=5)  # e.g. resumed from a checkpoint at epoch 5
    assert dm.train_dataloader().sampler.epoch == 5


class _Recorder(pl.LightningModule):
    """Records every training batch per epoch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.batches: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        self.batches.setdefault(self.current_epoch, []).append(batch)
        return self.weight * batch.float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_trainer_gives_each_epoch_its_crops_with_a_worker(text_file):
    # one persistent worker: the epoch must reach it through the sampler's indices
    dm = ByteTextDataModule(str(text_file), seq_len=8, batch_size=4, train_samples_per_epoch=8, num_workers=1,
                            allow_binary=True)
    model = _Recorder()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    seen = {epoch: torch.cat(batches) for epoch, batches in model.batches.items()}
    assert sorted(seen) == [0, 1, 2]
    for epoch, crops in seen.items():
        assert torch.equal(crops, torch.stack([dm.train_set[(epoch, i)] for i in range(8)]))
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


def test_datasets_pickle_and_work_in_worker_processes(text_file):
    dm = make_dm(text_file, seq_len=8, num_workers=1)
    clone = pickle.loads(pickle.dumps(dm.val_set))
    assert torch.equal(clone[0], dm.val_set[0])
    loader = dm.val_dataloader()
    assert loader.num_workers == 1
    assert torch.equal(torch.cat(list(loader)), torch.stack([dm.val_set[i] for i in range(len(dm.val_set))]))


# ---- distributed


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_items", [0, 1, 7, 10])
def test_shard_sampler_splits_without_padding(world_size, num_items):
    dataset = list(range(num_items))
    shards = [list(ShardSampler(dataset, num_replicas=world_size, rank=r)) for r in range(world_size)]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == dataset  # union == all, no overlap, nothing repeated
    assert [len(ShardSampler(dataset, world_size, r)) for r in range(world_size)] == [len(s) for s in shards]
    assert all(shard == sorted(shard) for shard in shards)  # in order within a rank


def test_shard_sampler_defaults_to_a_single_process():
    sampler = ShardSampler(list(range(5)))
    assert (sampler.num_replicas, sampler.rank, list(sampler)) == (1, 0, [0, 1, 2, 3, 4])


def test_lightning_ddp_keeps_eval_samplers_and_shards_train(text_file):
    dm = make_dm(text_file, train_samples_per_epoch=10)
    # building a ddp Trainer launches nothing; its data connector makes the real sampler decisions
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=3, logger=False,
                         enable_checkpointing=False)
    connector = trainer._data_connector
    val = dm.val_dataloader()
    assert connector._prepare_dataloader(val, shuffle=False, mode=RunningStage.VALIDATING) is val
    train = dm.train_dataloader()  # its sampler shards over the ranks itself, so Lightning must not wrap it
    assert connector._prepare_dataloader(train, shuffle=True, mode=RunningStage.TRAINING) is train
    _set_sampler_epoch(train, 4)  # what the fit loop does at each epoch start
    assert {epoch for epoch, _ in train.sampler} == {4}
    shards = [[i for _, i in EpochShuffleSampler(dm.train_set, shuffle=False, num_replicas=3, rank=r)]
              for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]  # in order; padded to equal shards as DDP needs


# ---- prompt and text helpers


def test_predict_yields_the_prompt(text_file):
    dm = make_dm(text_file, prompt="déf ")
    (batch,) = list(dm.predict_dataloader())
    assert batch.shape == (1, 5) and batch.dtype == torch.long
    assert dm.decode(batch) == "déf "


def test_encode_decode():
    ids = ByteTextDataModule.encode("añb")
    assert ids.tolist() == [97, 195, 177, 98]
    assert ByteTextDataModule.decode(torch.cat([ids, torch.tensor([-1, -1])])) == "añb"  # padding dropped
    assert ByteTextDataModule.decode([0xFF, 97]) == "\ufffda"  # invalid UTF-8 replaced


# ---- errors


@pytest.mark.parametrize("kwargs, match", [
    ({"seq_len": 0}, "seq_len must be >= 1"),
    ({"val_fraction": -0.1}, r"val_fraction must be in \[0, 1\)"),
    ({"test_fraction": 1.0}, r"test_fraction must be in \[0, 1\)"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"train_samples_per_epoch": 0}, "train_samples_per_epoch must be >= 1"),
    ({"pad_id": 0}, "pad_id=0 is a byte value"),
    ({"prompt": ""}, "prompt must be a non-empty"),
])
def test_bad_arguments_fail_at_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ByteTextDataModule(**kwargs)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match=re.escape(f"corpus path '{missing}' does not exist")):
        make_dm(missing)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="corpus is empty: .*empty.txt"):
        make_dm(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="corpus is empty: .*"):
        make_dm(tmp_path)  # a directory whose only text file is empty


def test_directory_without_text_files(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    (tmp_path / ".notes").write_bytes(b"hidden")
    with pytest.raises(ValueError, match=re.escape(f"no text files in directory '{tmp_path}'")):
        make_dm(tmp_path)


@pytest.mark.parametrize("split, kwargs", [
    ("train", {"seq_len": 4000, "val_fraction": 0.0, "test_fraction": 0.0}),
    ("val", {"seq_len": 100, "val_fraction": 0.01}),
    ("test", {"seq_len": 100, "test_fraction": 0.01}),
])
def test_short_split(text_file, split, kwargs):
    n = int(len(CORPUS) * kwargs.get(f"{split}_fraction", 0)) if split != "train" else len(CORPUS)
    need = kwargs["seq_len"] + 1
    with pytest.raises(ValueError, match=f"{split} split of .* has {n} bytes but seq_len=.* at least {need}: "
                                         "use a smaller seq_len"):
        make_dm(text_file, **kwargs)


def test_dataloader_before_setup(text_file):
    with pytest.raises(RuntimeError, match="call setup"):
        ByteTextDataModule(str(text_file)).train_dataloader()
