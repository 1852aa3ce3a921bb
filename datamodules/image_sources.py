"""Labelled images beyond folders, read from local disk and never downloaded.

`source` names the format under `root`:

- `folder` (the default, `HViTDataset`): `<split>/<class>/*.png|jpg|...`; the splits are the folders.
- `cifar10`, `cifar100`: the python batches, `cifar-10-batches-py/` (`data_batch_1..5`, `test_batch`,
  `batches.meta`) or `cifar-100-python/` (`train`, `test`, `meta`), or that folder itself as `root`;
  splits `train`, `test`.
- `mnist`, `fashion_mnist`: torchvision's layout, `MNIST/raw/` or `FashionMNIST/raw/` with the four idx
  files (`.gz` or not); splits `train`, `test`.
- `hf`: a Hugging Face `save_to_disk` folder (a `DatasetDict` of splits, or one `Dataset` = `train`), or
  a `.parquet` file or folder of them (= `train`), with an image column (`image`/`img`) and a label
  column (`label`/`labels`/`fine_label`); the saved splits.

Every source gives items `(PIL RGB image, class index)` and the attributes `classes` and `targets`,
as `HViTDataset` does, so `ImageDataModule` treats them alike (a missing `val` split is carved from
`train`). CIFAR batches are read directly (the documented pickle format, no checksum, so a re-packed
copy reads too); MNIST and Fashion-MNIST through torchvision with `download=False`.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

SOURCES = ("folder", "cifar10", "cifar100", "mnist", "fashion_mnist", "hf")
CIFAR = {  # source -> (folder name, files per split, label key, meta file, names key)
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                b"labels", "batches.meta", b"label_names"),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, b"fine_labels", "meta",
                 b"fine_label_names"),
}
HF_IMAGE_COLUMNS, HF_LABEL_COLUMNS = ("image", "img", "pixel_values"), ("label", "labels", "fine_label")


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"unknown image source {source!r}; choose one of {', '.join(SOURCES)}")
    return source


class LabelledImages(Dataset):
    """Items `(image, class index)`: `image(i)` a PIL image, converted to RGB, then `transform`ed.

    `classes` are the class names in index order, `targets` the class index of every item."""

    def __init__(self, image: Callable[[int], Image.Image], targets: Sequence[int], classes: Sequence[str],
                 transform: Callable | None = None) -> None:
        self.image, self.targets, self.classes, self.transform = image, list(targets), list(classes), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.image(index).convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]


# --- CIFAR python batches ------------------------------------------------------------------------

def _cifar_dir(source: str, root: Path) -> Path:
    folder = CIFAR[source][0]
    for candidate in (root / folder, root):
        if (candidate / CIFAR[source][3]).is_file():
            return candidate
    files = ", ".join([CIFAR[source][3], *sum(CIFAR[source][1].values(), [])])
    raise ValueError(f"{str(root)!r} holds no {source} python batches: expected {str(root / folder)!r} (or "
                     f"{str(root)!r} itself) with {files}")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"missing CIFAR batch file {str(path)!r}")
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar(source: str, root: Path, split: str, transform: Callable | None) -> LabelledImages:
    folder, files, label_key, meta, names_key = CIFAR[source]
    directory = _cifar_dir(source, root)
    batches = [_unpickle(directory / name) for name in files[split]]
    pixels = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    targets = [int(t) for b in batches for t in b[label_key]]
    classes = [name.decode() for name in _unpickle(directory / meta)[names_key]]
    return LabelledImages(lambda i: Image.fromarray(pixels[i]), targets, classes, transform)


# --- MNIST / Fashion-MNIST through torchvision ---------------------------------------------------

def _mnist(source: str, root: Path, split: str, transform: Callable | None) -> LabelledImages:
    from torchvision import datasets

    cls = datasets.MNIST if source == "mnist" else datasets.FashionMNIST
    try:
        data = cls(str(root), train=split == "train", download=False)
    except RuntimeError as exc:  # torchvision: "Dataset not found. You can use download=True ..."
        files = ", ".join(Path(url).name.removesuffix(".gz") for url, _ in cls.resources)
        raise ValueError(f"{str(root)!r} holds no {source} files: expected {str(root / cls.__name__ / 'raw')!r} "
                         f"with {files} (nothing is downloaded)") from exc
    images = data.data.numpy()
    return LabelledImages(lambda i: Image.fromarray(images[i], mode="L"), data.targets.tolist(), data.classes,
                          transform)


# --- Hugging Face data sets from disk ------------------------------------------------------------

def _hf_splits(root: Path) -> dict[str, Any]:
    import datasets

    if root.is_file() or (root.is_dir() and any(root.glob("*.parquet")) and not (root / "dataset_dict.json").exists()
                          and not (root / "dataset_info.json").exists()):
        files = [str(root)] if root.is_file() else sorted(str(p) for p in root.glob("*.parquet"))
        return {"train": datasets.Dataset.from_parquet(files)}
    try:
        loaded = datasets.load_from_disk(str(root))
    except FileNotFoundError as exc:
        raise ValueError(f"{str(root)!r} is neither a Hugging Face save_to_disk folder nor parquet: {exc}") from exc
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _column(names: Sequence[str], candidates: Sequence[str], what: str, root: Path) -> str:
    found = next((c for c in candidates if c in names), None)
    if found is None:
        raise ValueError(f"{str(root)!r} has no {what} column: looked for {', '.join(candidates)} among the "
                         f"columns {', '.join(names)}")
    return found


def _hf(root: Path, split: str, transform: Callable | None) -> LabelledImages:
    import datasets

    splits = _hf_splits(root)
    if split not in splits:
        raise ValueError(f"{str(root)!r} has no split {split!r}; it has {', '.join(splits)}")
    data = splits[split]
    image_col = _column(data.column_names, HF_IMAGE_COLUMNS, "image", root)
    label_col = _column(data.column_names, HF_LABEL_COLUMNS, "label", root)
    if not isinstance(data.features[image_col], datasets.Image):  # parquet written without HF's metadata
        data = data.cast_column(image_col, datasets.Image())
    label = data.features[label_col]
    targets = data[label_col]
    if isinstance(label, datasets.ClassLabel):
        classes = label.names
    else:  # plain integers or strings: classes in sorted order
        classes = sorted({str(t) for t in targets}, key=lambda c: (len(c), c) if c.isdigit() else (0, c))
        index = {c: i for i, c in enumerate(classes)}
        targets = [index[str(t)] for t in targets]
    images = data.select_columns([image_col])

    def image(i: int) -> Image.Image:
        value = images[i][image_col]
        return value if isinstance(value, Image.Image) else Image.open(io.BytesIO(value["bytes"]))

    return LabelledImages(image, targets, classes, transform)


# --- one entry point -----------------------------------------------------------------------------

def open_split(source: str, root: str | Path, split: str, transform: Callable | None = None) -> LabelledImages:
    """The labelled images of `split` of a non-folder `source` under `root` (see the module docstring)."""
    root = Path(root).expanduser()
    if check_source(source) == "folder":
        raise ValueError("open_split reads the non-folder sources; folders go through HViTDataset")
    if not root.exists():
        raise ValueError(f"image root {str(root)!r} does not exist")
    if source in CIFAR or source in ("mnist", "fashion_mnist"):
        if split not in ("train", "test"):
            raise ValueError(f"{source} has the splits train and test, not {split!r}")
        return (_cifar if source in CIFAR else _mnist)(source, root, split, transform)
    return _hf(root, split, transform)


def has_split(source: str, root: str | Path, split: str) -> bool:
    """Whether `split` exists for a non-folder `source` (`val` usually does not: it is carved from `train`)."""
    if source == "hf":
        return split in _hf_splits(Path(root).expanduser())
    return split in ("train", "test")
