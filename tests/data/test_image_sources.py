"""Image sources beyond folders (datamodules.image_sources): CIFAR python batches, MNIST idx files
through torchvision, Hugging Face save_to_disk folders and parquet; same items, classes and targets
as the folder source; clear errors for what is missing."""

import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from datamodules.image_sources import SOURCES, has_split, open_split

RNG = np.random.default_rng(0)


def write_cifar(root, source="cifar10", per_batch=4):
    folder, label_key, meta, names_key, files = {
        "cifar10": ("cifar-10-batches-py", b"labels", "batches.meta", b"label_names",
                    [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
        "cifar100": ("cifar-100-python", b"fine_labels", "meta", b"fine_label_names", ["train", "test"]),
    }[source]
    directory = root / folder
    directory.mkdir(parents=True)
    written = {}
    for name in files:
        data = RNG.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = [i % 3 for i in range(per_batch)]
        written[name] = (data, labels)
        (directory / name).write_bytes(pickle.dumps({b"data": data, label_key: labels}))
    (directory / meta).write_bytes(pickle.dumps({names_key: [b"cat", b"dog", b"ship"]}))
    return written


def write_idx(path, array):
    dims = array.shape
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("source", ["cifar10", "cifar100"])
def test_cifar_batches(tmp_path, source):
    written = write_cifar(tmp_path, source)
    train = open_split(source, tmp_path, "train")
    first_batch = "data_batch_1" if source == "cifar10" else "train"
    assert len(train) == (20 if source == "cifar10" else 4) and train.classes == ["cat", "dog", "ship"]
    image, target = train[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    expected = written[first_batch][0][1].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(image), expected)
    assert target == 1 and train.targets[:3] == [0, 1, 2]
    assert len(open_split(source, tmp_path / ("cifar-10-batches-py" if source == "cifar10" else "cifar-100-python"),
                          "test")) == 4  # the batches folder itself also works
    with pytest.raises(ValueError, match="splits train and test"):
        open_split(source, tmp_path, "val")


def test_mnist_through_torchvision(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 6), ("t10k", 3)):
        write_idx(raw / f"{split}-images-idx3-ubyte", RNG.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    train, test = open_split("mnist", tmp_path, "train"), open_split("mnist", tmp_path, "test")
    assert (len(train), len(test)) == (6, 3) and train.classes[0].startswith("0")
    image, target = train[4]
    assert image.mode == "RGB" and image.size == (28, 28) and target == 4
    with pytest.raises(ValueError, match="holds no fashion_mnist files.*FashionMNIST"):
        open_split("fashion_mnist", tmp_path, "train")


def hf_dataset(n, with_class_label=True):
    import datasets

    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["a", "b"])
                                 if with_class_label else datasets.Value("int64"))
    images = [Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)


def test_hugging_face_save_to_disk_and_parquet(tmp_path):
    import datasets

    datasets.DatasetDict(train=hf_dataset(5), test=hf_dataset(2)).save_to_disk(tmp_path / "dict")
    train = open_split("hf", tmp_path / "dict", "train")
    assert len(train) == 5 and train.classes == ["a", "b"] and train.targets == [0, 1, 0, 1, 0]
    assert train[0][0].mode == "RGB" and train[0][0].size == (8, 8)
    assert has_split("hf", tmp_path / "dict", "test") and not has_split("hf", tmp_path / "dict", "val")
    hf_dataset(4, with_class_label=False).to_parquet(tmp_path / "plain.parquet")
    plain = open_split("hf", tmp_path / "plain.parquet", "train")
    assert len(plain) == 4 and plain.classes == ["0", "1"] and plain[1][1] == 1
    with pytest.raises(ValueError, match="no split 'val'; it has train, test"):
        open_split("hf", tmp_path / "dict", "val")


def test_bad_sources_say_what_is_expected(tmp_path):
    with pytest.raises(ValueError, match="unknown image source 'imagenet'; choose one of"):
        open_split("imagenet", tmp_path, "train")
    with pytest.raises(ValueError, match="holds no cifar10 python batches: expected"):
        open_split("cifar10", tmp_path, "train")
    with pytest.raises(ValueError, match="does not exist"):
        open_split("mnist", tmp_path / "nowhere", "train")
    assert "folder" in SOURCES


def test_image_datamodule_reads_a_source(tmp_path):
    """ImageDataModule(source=...): classes at __init__, validation carved from train (stratified),
    the official test split, decoded in memory like any folder; a source without root is refused."""
    from datamodules.images import ImageDataModule

    write_cifar(tmp_path, per_batch=6)
    dm = ImageDataModule(root=str(tmp_path), source="cifar10", img_size=32, batch_size=4, val_fraction=0.2,
                         test_split="test")
    assert dm.classes == ["cat", "dog", "ship"] and dm.num_classes == 3
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 30 and len(dm.val_dataset) == 6
    image, target = dm.val_dataset[0]
    assert image.shape == (3, 32, 32) and 0 <= target < 3
    dm.setup("test")
    assert len(dm.test_dataset) == 6
    in_memory = ImageDataModule(root=str(tmp_path), source="cifar10", img_size=16, in_memory=True, val_fraction=0.2)
    in_memory.setup("fit")
    assert in_memory.train_dataset.images.shape == (24, 3, 16, 16)
    with pytest.raises(ValueError, match="source='mnist' reads files under root"):
        ImageDataModule(source="mnist")
    with pytest.raises(ValueError, match="unknown image source"):
        ImageDataModule(root=str(tmp_path), source="cifar")
