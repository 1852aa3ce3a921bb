"""Image folders: HViTDataset, the digits cache, ImageDataModule (shapes, val carving, mixup, predict)."""

import os
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

import datamodules.images as images
from datamodules.images import (
    CorruptImageError,
    HViTDataset,
    ImageDataModule,
    ImageFiles,
    cache_dir,
    prepare_digits,
    stratified_split,
)


def write_folder(root: Path, split: str, counts: dict[str, int], size: int = 12) -> None:
    """`root/split/<class>/<i>.png`: solid images whose grey level encodes the class."""
    for c, (name, n) in enumerate(counts.items()):
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("L", (size, size), color=40 * c + i).save(root / split / name / f"{i:03d}.png")


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    """The digits written once into a private cache for this module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("HIERTRANS_CACHE", str(cache))
        yield prepare_digits()


# --- HViTDataset ---------------------------------------------------------------------------------


def test_dataset_classes_samples_and_items(tmp_path):
    write_folder(tmp_path, "train", {"cat": 3, "ant": 2})
    Image.new("RGB", (5, 5)).save(tmp_path / "train" / "cat" / "UPPER.PNG")  # extensions: any case
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".hidden").mkdir()  # not a class
    ds = HViTDataset(tmp_path, split="train")
    assert ds.classes == ["ant", "cat"] and ds.class_to_idx == {"ant": 0, "cat": 1}
    assert len(ds) == 6 and ds.targets == [0, 0, 1, 1, 1, 1]
    assert [Path(p).name for p, _ in ds.samples] == sorted(Path(p).name for p, _ in ds.samples[:2]) + [
        "000.png", "001.png", "002.png", "UPPER.PNG"]
    image, target = ds[2]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and target == 1  # grayscale -> RGB
    ds = HViTDataset(tmp_path, transform=images.eval_transform(8), split="train")
    x, _ = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32


def test_missing_root_and_split_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        HViTDataset(tmp_path / "nope")
    write_folder(tmp_path, "train", {"a": 1})
    with pytest.raises(ValueError) as err:
        HViTDataset(tmp_path, split="val")
    assert str(tmp_path / "val") in str(err.value) and "'train'" in str(err.value)


def test_empty_split_and_empty_class_name_the_path(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class folders") as err:
        HViTDataset(tmp_path)
    assert str(tmp_path / "train") in str(err.value)
    (tmp_path / "train" / "a").mkdir()
    (tmp_path / "train" / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="without images") as err:
        HViTDataset(tmp_path)
    assert str(tmp_path / "train") in str(err.value) and "'a'" in str(err.value)


def test_corrupt_image_raises_naming_the_file_or_is_skipped(tmp_path):
    write_folder(tmp_path, "train", {"a": 2, "b": 1})
    bad = tmp_path / "train" / "a" / "000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    ds = HViTDataset(tmp_path)
    with pytest.raises(CorruptImageError, match="000.png"):
        ds[0]
    ds = HViTDataset(tmp_path, skip_corrupt=True)
    with pytest.warns(UserWarning, match="000.png"):
        image, target = ds[0]
    assert ds.samples[1][0].endswith("001.png") and target == 0 and image.size == (12, 12)  # the next one
    # truncated file: the header parses, decoding fails
    good = tmp_path / "train" / "b" / "000.png"
    good.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CorruptImageError, match=str(good.name)):
        HViTDataset(tmp_path)[2]


def test_every_image_mode_becomes_8_bit_rgb(tmp_path):
    """Grayscale, palette, RGBA (transparent over black), 16-bit grayscale (scaled, not clipped) and a
    palette with a transparent colour in one class folder; a non-image file is named in a warning."""
    import numpy as np

    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    Image.new("L", (4, 4), 100).save(folder / "gray.png")
    palette = Image.new("P", (4, 4), 2)
    palette.putpalette([0, 0, 0, 9, 9, 9, 10, 200, 30] + [0] * 759)
    palette.save(folder / "palette.bmp")
    Image.new("RGBA", (4, 4), (255, 255, 255, 0)).save(folder / "transparent.png")
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(folder / "sixteen.png")
    with_hole = Image.new("P", (4, 4), 1)
    with_hole.putpalette([0, 0, 0, 250, 250, 250] + [0] * 762)
    with_hole.save(folder / "palette_transparent.png", transparency=1)
    (folder / "labels.csv").write_text("not an image")
    with pytest.warns(UserWarning, match=r"ignored 1 files without an image extension .*labels.csv"):
        ds = HViTDataset(tmp_path)
    pixels = {Path(path).stem: np.asarray(ds[i][0]) for i, (path, _) in enumerate(ds.samples)}
    assert all(p.shape == (4, 4, 3) and p.dtype == np.uint8 for p in pixels.values())
    assert (pixels["gray"] == 100).all() and (pixels["palette"] == (10, 200, 30)).all()
    assert (pixels["transparent"] == 0).all() and (pixels["palette_transparent"] == 0).all()  # over black
    assert (pixels["sixteen"] == round(40000 / 257)).all()  # 155, where PIL's own convert gives 255


def test_zero_byte_images_are_named_or_skipped(tmp_path):
    write_folder(tmp_path, "train", {"a": 2, "b": 1})
    (tmp_path / "train" / "a" / "empty.jpg").write_bytes(b"")
    with pytest.raises(CorruptImageError, match=r"empty \(0-byte\) image files: .*empty.jpg.*skip_corrupt"):
        HViTDataset(tmp_path)
    with pytest.warns(UserWarning, match="skipping empty .*empty.jpg"):
        ds = HViTDataset(tmp_path, skip_corrupt=True)
    assert len(ds) == 3
    with pytest.raises(CorruptImageError, match="predict_root .*empty.jpg"):  # images to label, too
        ImageFiles(tmp_path)
    assert len(ImageFiles(tmp_path, skip_corrupt=True)) == 3


def test_image_files_for_predict(tmp_path):
    with pytest.raises(ValueError, match="predict_root"):
        ImageFiles(tmp_path)
    write_folder(tmp_path, "x", {"deep": 2})
    Image.new("RGB", (4, 4)).save(tmp_path / "top.jpg")
    ds = ImageFiles(tmp_path, images.eval_transform(8))
    assert len(ds) == 3
    x, path = ds[0]
    assert x.shape == (3, 8, 8) and path == str(tmp_path / "top.jpg")


def test_stratified_split_is_deterministic_and_stratified():
    targets = [0] * 50 + [1] * 30 + [2] * 2
    train, held = stratified_split(targets, 0.2, seed=3)
    assert stratified_split(targets, 0.2, seed=3) == (train, held)
    assert stratified_split(targets, 0.2, seed=4) != (train, held)
    assert sorted(train + held) == list(range(len(targets)))
    assert [sum(targets[i] == c for i in held) for c in range(3)] == [10, 6, 1]


# --- digits cache --------------------------------------------------------------------------------


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("HIERTRANS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "hiertrans"
    monkeypatch.setenv("HIERTRANS_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_digits_written_once_and_reused(digits_root, monkeypatch):
    train, val = HViTDataset(digits_root, split="train"), HViTDataset(digits_root, split="val")
    assert (len(train), len(val)) == (1437, 360)
    assert train.classes == val.classes == [str(d) for d in range(10)]
    assert {Path(p).name for p, _ in train.samples}.isdisjoint(Path(p).name for p, _ in val.samples)
    counts = torch.bincount(torch.tensor(val.targets))
    assert counts.min() >= 35 and counts.max() <= 37  # stratified
    image, target = val[0]
    assert image.size == (8, 8) and image.mode == "RGB" and target == 0

    def no_rewrite(*args, **kwargs):
        raise AssertionError("digits written twice")

    monkeypatch.setattr("sklearn.datasets.load_digits", no_rewrite)
    assert prepare_digits() == digits_root


def test_digits_failed_write_leaves_nothing(tmp_path, monkeypatch):
    saved = 0
    real_save = Image.Image.save

    def failing_save(self, *args, **kwargs):
        nonlocal saved
        saved += 1
        if saved > 100:
            raise OSError("disk full (simulated)")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        prepare_digits(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither digits/ nor the temporary sibling


def test_digits_lost_race_keeps_the_winner(tmp_path, monkeypatch):
    """Another writer renames its copy into place first: ours is discarded, theirs is used."""
    real_replace = os.replace

    def other_writer_first(src, dst):
        write_folder(Path(dst), "train", {"0": 1})  # the winner's (non-empty) folder
        return real_replace(src, dst)  # now fails: the target is a non-empty directory

    monkeypatch.setattr(images.os, "replace", other_writer_first)
    root = prepare_digits(tmp_path)
    assert root == tmp_path / "digits" and [p.name for p in tmp_path.iterdir()] == ["digits"]
    assert len(HViTDataset(root)) == 1


# --- ImageDataModule -----------------------------------------------------------------------------


def test_digits_datamodule_shapes(digits_root):
    dm = ImageDataModule(batch_size=16, img_size=24)
    assert dm.num_classes == 10 and dm.in_chans == 3
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (1437, 360)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 24, 24) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    v1, _ = next(iter(dm.val_dataloader()))
    v2, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(v1, v2)  # deterministic eval transform and order
    dm.setup("test")
    assert dm.test_dataset is dm.val_dataset  # test_split=None


def test_num_classes_known_before_any_write(tmp_path, monkeypatch):
    monkeypatch.setenv("HIERTRANS_CACHE", str(tmp_path / "cache"))
    assert ImageDataModule().num_classes == 10
    assert not (tmp_path / "cache").exists()
    write_folder(tmp_path / "data", "train", {"a": 1, "b": 1, "c": 1})
    assert ImageDataModule(str(tmp_path / "data")).num_classes == 3


def test_val_carved_from_train_when_no_val_folder(tmp_path):
    write_folder(tmp_path, "train", {"a": 10, "b": 10, "c": 5})
    dm = ImageDataModule(str(tmp_path), img_size=8, batch_size=4, val_fraction=0.2, seed=1)
    dm.setup("fit")
    train, val = dm.train_dataset, dm.val_dataset
    assert (len(train), len(val)) == (20, 5)
    assert set(train.indices).isdisjoint(val.indices)
    assert [sum(val.dataset.targets[i] == c for i in val.indices) for c in range(3)] == [2, 2, 1]
    again = ImageDataModule(str(tmp_path), img_size=8, val_fraction=0.2, seed=1)
    again.setup("fit")
    assert again.val_dataset.indices == val.indices
    x, y = val[0]
    assert x.shape == (3, 8, 8)


def test_datamodule_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageDataModule(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="val_fraction"):
        ImageDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        ImageDataModule(crop_scale=(0.9, 0.1))
    write_folder(tmp_path, "train", {"a": 2, "b": 2})
    write_folder(tmp_path, "val", {"a": 1, "z": 1})
    dm = ImageDataModule(str(tmp_path))
    with pytest.raises(ValueError, match="same folders"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="predict_root"):
        dm.setup("predict")


def test_augmentation_and_mixup_cutmix(tmp_path):
    write_folder(tmp_path, "train", {"a": 6, "b": 6})
    dm = ImageDataModule(str(tmp_path), img_size=8, batch_size=6, random_resized_crop=True, hflip=True,
                         randaugment=True, random_erasing=0.5, mixup_alpha=0.2, cutmix_alpha=1.0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 8, 8) and y.shape == (6, 2)
    assert torch.allclose(y.sum(-1), torch.ones(6))
    _, yv = next(iter(dm.val_dataloader()))
    assert yv.ndim == 1  # no mixing outside training


def test_predict_dataloader_yields_paths(tmp_path):
    write_folder(tmp_path / "data", "train", {"a": 1, "b": 1})
    write_folder(tmp_path, "unlabelled", {"sub": 3})
    dm = ImageDataModule(str(tmp_path / "data"), img_size=8, batch_size=2,
                         predict_root=str(tmp_path / "unlabelled"))
    dm.setup("predict")
    x, paths = next(iter(dm.predict_dataloader()))
    assert x.shape == (2, 3, 8, 8) and len(paths) == 2 and paths[0].endswith("000.png")


def test_real_cifar10_folder(tmp_path):
    """A slice of the real CIFAR-10 JPEGs through HViTDataset and the datamodule's val carving."""
    archive = SHARED_DATA / "cifar10-train.tar.gz"
    if not archive.is_file():
        pytest.skip(f"real-data test: {archive} is absent (it lives outside the repository)")
    per_class = 30
    with tarfile.open(archive) as tar:
        taken: dict[str, int] = {}
        for member in tar:  # stream once; extract the first 30 images of every class (~4 s)
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and taken.get(parts[1], 0) < per_class:
                taken[parts[1]] = taken.get(parts[1], 0) + 1
                tar.extract(member, tmp_path, filter="data")
    ds = HViTDataset(tmp_path, split="train")
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                          "truck"]
    assert len(ds) == 10 * per_class
    image, _ = ds[0]
    assert image.size == (32, 32) and image.mode == "RGB"
    dm = ImageDataModule(str(tmp_path), batch_size=8, val_fraction=0.1)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (270, 30)  # 3 per class
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 32, 32)


# --- in-memory data and batched augmentation ------------------------------------------------------


def test_batched_crop_is_identity_at_full_scale_and_flips_per_image():
    x = torch.rand(16, 3, 8, 8)
    same = images.random_resized_crop_flip(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    assert torch.allclose(same, x, atol=1e-5)
    torch.manual_seed(0)
    flipped = images.random_resized_crop_flip(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True)
    is_flip = torch.tensor([torch.allclose(f, i.flip(-1), atol=1e-5) for f, i in zip(flipped, x)])
    is_same = torch.tensor([torch.allclose(f, i, atol=1e-5) for f, i in zip(flipped, x)])
    assert (is_flip ^ is_same).all() and 0 < is_flip.sum() < 16  # each image either, per image
    crops = images.random_resized_crop_flip(x, scale=(0.3, 0.5))
    assert crops.shape == x.shape and not torch.allclose(crops, x)
    assert crops.min() >= x.min() - 1e-6 and crops.max() <= x.max() + 1e-6  # bilinear: no overshoot


class _Stage:
    """Stands in for the trainer's state flags that `on_after_batch_transfer` reads."""

    def __init__(self, training: bool) -> None:
        self.training, self.predicting = training, False


def test_in_memory_matches_folder_path_for_evaluation(tmp_path):
    write_folder(tmp_path, "train", {"a": 5, "b": 5}, size=12)
    common = dict(img_size=8, batch_size=4, val_fraction=0.2, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    folder, memory = ImageDataModule(str(tmp_path), **common), ImageDataModule(str(tmp_path), in_memory=True, **common)
    folder.setup("fit")
    memory.setup("fit")
    assert isinstance(memory.train_dataset, images.InMemoryImages) and memory.train_dataset.images.dtype == torch.uint8
    assert len(memory.train_dataset) == len(folder.train_dataset) == 8
    memory.trainer = _Stage(training=False)
    for (xf, yf), raw in zip(folder.val_dataloader(), memory.val_dataloader()):
        xm, ym = memory.on_after_batch_transfer(raw, 0)
        assert torch.allclose(xm, xf, atol=1e-5) and torch.equal(ym, yf)
    memory.trainer = _Stage(training=True)
    x, y = memory.on_after_batch_transfer(next(iter(memory.train_dataloader())), 0)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long


def test_in_memory_mixup_and_unsupported_augmentations(tmp_path):
    write_folder(tmp_path, "train", {"a": 6, "b": 6})
    dm = ImageDataModule(str(tmp_path), img_size=8, batch_size=6, in_memory=True, random_resized_crop=True,
                         hflip=True, mixup_alpha=0.2, cutmix_alpha=1.0)
    dm.setup("fit")
    dm.trainer = _Stage(training=True)
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.shape == (6, 3, 8, 8) and y.shape == (6, 2) and torch.allclose(y.sum(-1), torch.ones(6))
    for bad in (dict(randaugment=True), dict(random_erasing=0.25)):
        with pytest.raises(ValueError, match="in_memory=False"):
            ImageDataModule(str(tmp_path), in_memory=True, **bad)


def test_normalisation_comes_from_the_networks_pretrained_cfg(tmp_path):
    """mean/std unset: the training network's pretrained_cfg (timm models), else 0.5; set: as given."""
    from types import SimpleNamespace

    import timm

    net = timm.create_model("hvit_cifar", depths=(1, 1, 1, 1))
    dm = ImageDataModule(batch_size=4, img_size=32)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(net=net))
    dm.setup("fit")
    assert (dm.mean, dm.std) == (tuple(net.pretrained_cfg["mean"]), tuple(net.pretrained_cfg["std"]))
    plain = ImageDataModule(batch_size=4, img_size=32)
    plain.setup("fit")
    assert plain.mean == (0.5, 0.5, 0.5)
    given = ImageDataModule(batch_size=4, img_size=32, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    given.trainer = dm.trainer
    given.setup("fit")
    assert given.mean == (0.1, 0.2, 0.3)
    with pytest.raises(ValueError, match="set mean and std together"):
        ImageDataModule(mean=(0.5, 0.5, 0.5))
