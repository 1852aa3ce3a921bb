"""Image folders for classification: `HViTDataset`, the embedded digits default and `ImageDataModule`.

Layout read everywhere (torchvision's ImageFolder layout, one folder per split):

    root/<split>/<class>/<image>          e.g. root/train/cat/0001.jpg, root/val/cat/0042.jpg

The default data set is scikit-learn's bundled handwritten digits (1,797 real 8x8 grayscale images,
no download), written once as such a folder into a cache directory, so the default run goes
through exactly the code path a user's data does.

Any mix of image modes in one folder becomes 8-bit RGB (`to_rgb`): grayscale is replicated, 16-bit
grayscale scaled to 8 bits (65535 -> 255), palette images expanded, transparent pixels (RGBA, LA,
palette transparency) composited over black. Files without an image extension are ignored with a
warning that names them; empty (0-byte) image files are named in an error at start-up, unreadable
ones when loaded (`skip_corrupt=True` skips both with a warning).

Training is exactly resumable: `EpochShuffleSampler` orders each epoch by a permutation seeded with
(seed, epoch), shards it over ranks itself and restarts mid-epoch where a checkpoint stopped, and
every random augmentation of image i in epoch e (crop, flip, RandAugment, erasing, and mixup/cutmix
of its batch) draws from the RNG seeded with (seed, e, i), whichever loader worker decodes it.
"""

import contextlib
import math
import os
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate
from torchvision.transforms import v2

from hiertrans.io import atomic_directory, cache_dir

from .image_sources import LabelledImages, check_source, has_split, open_split
from .samplers import EpochShuffleSampler, ShardSampler, mix, resumable_sampler  # noqa: F401  (importable here as before)

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DIGITS_CLASSES = [str(d) for d in range(10)]
DIGITS_VAL_SIZE = 360  # of 1,797: 1,437 train / 360 val, stratified, fixed seed
DIGITS_SEED = 0


class CorruptImageError(ValueError):
    """An image file that PIL cannot open or decode; the message names the file."""


# ----------------------------------------------------------------------------- file listing


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".")


def scan_images(directory: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """`(images, empty, other)` under `directory`, recursively and sorted (deterministic indices):
    non-empty image files, 0-byte image files, and visible files without an image extension.
    One `stat` per file."""
    images, empty, other = [], [], []
    for p in sorted(directory.rglob("*")):
        try:
            st = p.stat()
        except OSError:  # a dangling link is no file
            continue
        if not stat.S_ISREG(st.st_mode) or p.name.startswith("."):
            continue
        if not is_image_file(p):
            other.append(p)
        else:
            (images if st.st_size else empty).append(p)
    return images, empty, other


def list_images(directory: Path) -> list[Path]:
    """All non-empty image files under `directory` (recursively), sorted so that indices are deterministic."""
    return scan_images(directory)[0]


def _named(paths: Sequence[Path], limit: int = 5) -> str:
    shown = ", ".join(repr(str(p)) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def subdirectories(directory: Path) -> list[str]:
    """Sorted names of the visible subdirectories (`.ipynb_checkpoints` and friends are not classes)."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def split_dir(root: str | Path, split: str) -> Path:
    """`root/split`, or a ValueError naming the path looked at and the splits that do exist."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder root {str(root)!r} does not exist or is not a directory")
    directory = root / split
    if not directory.is_dir():
        found = subdirectories(root)
        raise ValueError(f"no {split!r} split: {str(directory)!r} is not a directory; "
                         f"splits under {str(root)!r}: {found or 'none'}")
    return directory


def find_classes(root: str | Path, split: str) -> list[str]:
    """Class names of `root/split` (its sorted subfolders); ValueError when it has none."""
    directory = split_dir(root, split)
    classes = subdirectories(directory)
    if not classes:
        raise ValueError(f"split folder {str(directory)!r} has no class folders; expected "
                         f"{str(directory)}/<class>/<image> with extensions {', '.join(IMG_EXTENSIONS)}")
    return classes


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16/32-bit integer grayscale ("I;16*", "I") scaled from the 16-bit range
    (65535 -> 255), transparency (RGBA, LA, PA, palette with a transparent colour) composited over black,
    everything else (grayscale, palette, CMYK, YCbCr, float) converted by PIL."""
    if image.mode.startswith("I;16") or image.mode == "I":  # PIL's own convert would clip at 255
        pixels = np.asarray(image).astype(np.float64) / 257.0
        image = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB (`to_rgb`); CorruptImageError naming the file when
    that fails."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes: truncated files fail here, not later
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(f"cannot read image file {str(path)!r}: {exc}") from exc


# ----------------------------------------------------------------------------- data sets


class HViTDataset(Dataset):
    """Labelled images from `root/<split>/<class>/<image>`.

    Classes are the sorted subfolder names of the split (`classes`, `class_to_idx`); `samples` is
    the sorted list of `(path, class index)`, `targets` the class indices alone. Items are
    `(transform(image), target)` where the image is a PIL RGB image (3 channels whatever the file
    holds: `to_rgb`) unless `transform` turns it into a `(3, H, W)` tensor.

    Files without an image extension are left out with a warning naming them. Empty (0-byte) image
    files are found here, when the folder is listed: `CorruptImageError` naming them, or with
    `skip_corrupt=True` a warning and they are left out. Other corrupt files are detected lazily,
    when an item is loaded (decoding 50k JPEGs at start-up would cost minutes): by default loading
    one raises `CorruptImageError` naming the file; with `skip_corrupt=True` a warning names it and
    the next readable sample is returned instead.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, split: str = "train",
                 skip_corrupt: bool = False) -> None:
        self.root, self.split, self.transform, self.skip_corrupt = Path(root), split, transform, skip_corrupt
        self.classes = find_classes(root, split)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        directory = self.root / split
        self.samples: list[tuple[str, int]] = []
        without, zero_byte, ignored = [], [], []
        for name in self.classes:
            files, empty, other = scan_images(directory / name)
            zero_byte += empty
            ignored += other
            if not files:
                without.append(name)
            self.samples += [(str(f), self.class_to_idx[name]) for f in files]
        if ignored:
            rank_zero_warn(f"split folder {str(directory)!r}: ignored {len(ignored)} files without an image "
                           f"extension ({', '.join(IMG_EXTENSIONS)}): {_named(ignored)}")
        if zero_byte and not skip_corrupt:
            raise CorruptImageError(f"split folder {str(directory)!r}: empty (0-byte) image files: "
                                    f"{_named(zero_byte)}; delete them or set skip_corrupt: true to skip them")
        if zero_byte:
            rank_zero_warn(f"skipping empty (0-byte) image files (skip_corrupt=True): {_named(zero_byte)}")
        if without:
            everything = " (every class folder is empty)" if len(without) == len(self.classes) else ""
            raise ValueError(f"split folder {str(directory)!r}: class folders without images{everything} "
                             f"(extensions {', '.join(IMG_EXTENSIONS)}): {without}")
        self.targets = [t for _, t in self.samples]
        self.corrupt: set[int] = set()  # indices found unreadable (per process: workers keep their own)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            if i in self.corrupt:
                continue
            path, target = self.samples[i]
            try:
                image = load_rgb(path)
            except CorruptImageError as exc:
                if not self.skip_corrupt:
                    raise
                self.corrupt.add(i)
                warnings.warn(f"skipping corrupt image (skip_corrupt=True): {exc}", stacklevel=2)
                continue
            return (self.transform(image) if self.transform else image), target
        raise CorruptImageError(f"no readable image left in {str(self.root / self.split)!r}")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
                f"{len(self)} images, {len(self.classes)} classes)")


class ImageFiles(Dataset):
    """Unlabelled images under `root`, recursively (no class folders needed): items `(image, path)`.
    Empty (0-byte) image files: `CorruptImageError` naming them, or left out with a warning
    (`skip_corrupt=True`)."""

    def __init__(self, root: str | Path, transform: Callable | None = None, skip_corrupt: bool = False) -> None:
        self.root, self.transform = Path(root), transform
        if not self.root.is_dir():
            raise ValueError(f"predict_root {str(root)!r} does not exist or is not a directory")
        files, empty, _ = scan_images(self.root)
        if empty and not skip_corrupt:
            raise CorruptImageError(f"predict_root {str(root)!r}: empty (0-byte) image files: {_named(empty)}; "
                                    f"delete them or set skip_corrupt: true to skip them")
        if empty:
            rank_zero_warn(f"skipping empty (0-byte) image files (skip_corrupt=True): {_named(empty)}")
        self.files = [str(p) for p in files]
        if not self.files:
            raise ValueError(f"predict_root {str(root)!r} holds no images ({', '.join(IMG_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = load_rgb(self.files[index])
        return (self.transform(image) if self.transform else image), self.files[index]


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic stratified hold-out: about `fraction` of every class (at least one image of
    each class with two or more) goes to the second list. Returns sorted (train, held-out) indices."""
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    train, held = [], []
    for cls in sorted(by_class):
        idx = torch.tensor(by_class[cls])[torch.randperm(len(by_class[cls]), generator=generator)].tolist()
        n = round(len(idx) * fraction)
        n = min(max(n, 1), len(idx) - 1) if len(idx) > 1 else 0
        held += idx[:n]
        train += idx[n:]
    return sorted(train), sorted(held)


# ----------------------------------------------------------------------------- resumable training order


@contextlib.contextmanager
def seeded_rng(seed: int | None, device: torch.device | None = None) -> Iterator[None]:
    """Inside: the global RNG (the CPU's and `device`'s) seeded with `seed`; after: as it was before.
    `seed=None`: the global RNG untouched."""
    if seed is None:
        yield
        return
    accelerator = device is not None and device.type != "cpu"
    with torch.random.fork_rng([device] if accelerator else [], device_type=device.type if accelerator else "cuda"):
        torch.manual_seed(seed)
        yield


class SeededItems(Dataset):
    """`dataset` indexed by `(epoch, i)` keys: item i, with every random draw of its transform made under
    the RNG seeded with (seed, epoch, i) (`seeded_rng`), whatever process loads it. Items are `(*item,
    item_seed)`; `SeededCollate` turns the seeds of a batch into one seed for batch-level randomness."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        epoch, i = key
        item_seed = mix(self.seed, epoch, i)
        with seeded_rng(item_seed):
            return (*self.dataset[i], item_seed)


class SeededCollate:
    """Collate `(image, target, item_seed)` training items; the batch's seed is a hash of its items' seeds.

    `mix` (a `MixupCutmixCollate`, or None) mixes the batch under the RNG seeded with it; with
    `keep_seed` the batch is `(images, targets, seed)` for randomness applied later on the device
    (`ImageDataModule.on_after_batch_transfer`), else `(images, targets)`.
    """

    def __init__(self, mix: "MixupCutmixCollate | None" = None, keep_seed: bool = False) -> None:
        self.mix, self.keep_seed = mix, keep_seed

    def __call__(self, batch: list[tuple]) -> tuple:
        images, targets, seeds = default_collate(batch)
        seed = mix(*seeds.tolist())
        if self.mix is not None:
            with seeded_rng(seed):
                images, targets = self.mix.mix(images, targets)
        return (images, targets, torch.tensor(seed)) if self.keep_seed else (images, targets)


# ----------------------------------------------------------------------------- digits cache


def prepare_digits(cache: str | Path | None = None) -> Path:
    """Write scikit-learn's digits once as `<cache>/digits/{train,val}/<digit>/<index>.png`; return
    `<cache>/digits`.

    1,797 8x8 grayscale PNGs (values 0-16 scaled to 0-255), split 1,437/360 stratified with a fixed
    seed. Written into a temporary sibling directory and moved into place with one `os.replace`, so
    an interrupted write never leaves a half-written folder and concurrent writers (DDP ranks, two
    jobs) cannot corrupt it: the first rename wins and the others discard their copy.
    """
    final = (Path(cache) if cache is not None else cache_dir()) / "digits"
    with atomic_directory(final) as tmp:
        if tmp is None:
            return final
        from sklearn.datasets import load_digits  # only needed once per machine
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        pixels = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype("uint8")
        train_idx, val_idx = train_test_split(range(len(pixels)), test_size=DIGITS_VAL_SIZE,
                                              stratify=digits.target, random_state=DIGITS_SEED)
        for split, indices in (("train", train_idx), ("val", val_idx)):
            for name in DIGITS_CLASSES:
                (tmp / split / name).mkdir(parents=True)
            for i in indices:
                Image.fromarray(pixels[i]).save(tmp / split / str(digits.target[i]) / f"{i:04d}.png")
    return final


# ----------------------------------------------------------------------------- transforms


def train_transform(img_size: int, *, random_resized_crop: bool = False, crop_scale=(0.35, 1.0),
                    hflip: bool = False, randaugment: bool = False, randaugment_magnitude: int = 9,
                    random_erasing: float = 0.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> v2.Compose:
    """PIL image -> normalised `(3, img_size, img_size)` float tensor, with the chosen augmentations."""
    ops: list = [v2.ToImage()]
    if random_resized_crop:
        ops.append(v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), antialias=True))
    else:
        ops += [v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if randaugment:  # on uint8, before normalisation, as RandAugment's colour ops expect
        ops.append(v2.RandAugment(magnitude=randaugment_magnitude))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if random_erasing > 0:
        ops.append(v2.RandomErasing(p=random_erasing))
    return v2.Compose(ops)


def eval_transform(img_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> v2.Compose:
    """Deterministic: resize the short side, center crop, normalise."""
    return v2.Compose([v2.ToImage(), v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


class MixupCutmixCollate:
    """Collate a batch, then apply MixUp or CutMix (one of them at random when both are on).

    Runs in the loader workers, where it is free; targets become soft `(B, num_classes)` float
    tensors, which the classifier's cross-entropy accepts as they are.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> None:
        ops = []
        if mixup_alpha > 0:
            ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not ops:
            raise ValueError("MixupCutmixCollate needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mix = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    def __call__(self, batch):
        return self.mix(*default_collate(batch))


def random_resized_crop_flip(images: Tensor, scale: tuple[float, float] = (0.35, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True) -> Tensor:
    """A random resized crop (and horizontal flip) per image of a batch, in one `grid_sample`.

    `images (B, C, H, W)` float -> same shape. Crops follow torchvision's `RandomResizedCrop`
    (area fraction uniform in `scale`, log-uniform aspect `ratio`), with sub-pixel positions and
    crop sides clamped to the image instead of torchvision's rejection sampling; bilinear
    resampling. Runs on the batch's device with the global RNG.
    """
    b, device = images.shape[0], images.device
    area = torch.empty(b, device=device).uniform_(*scale)
    log_ratio = torch.empty(b, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop sides as fractions of the image
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    centre_x = (torch.rand(b, device=device) * 2 - 1) * (1 - width)  # in [-1, 1], crop inside image
    centre_y = (torch.rand(b, device=device) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(b, device=device) < 0.5, -1.0, 1.0) if hflip else torch.ones(b, device=device)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_hflip(images: Tensor) -> Tensor:
    """Flip each image of `images (B, C, H, W)` left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, images.flip(-1), images)


class InMemoryImages(Dataset):
    """A labelled image data set decoded once into one uint8 tensor: items `(image (3, S, S) uint8,
    target)`. `decode` resizes each image's short side to `img_size` and centre-crops it, so images of
    any size fit; memory is `len(dataset) * 3 * img_size**2` bytes (147 MB for CIFAR-10 at 32 px)."""

    def __init__(self, images: Tensor, targets: Tensor, classes: list[str]) -> None:
        self.images, self.targets, self.classes = images, targets, classes

    @classmethod
    def decode(cls, dataset: Dataset, img_size: int) -> "InMemoryImages":
        to_tensor = v2.Compose([v2.ToImage(), v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)])
        images = torch.empty(len(dataset), 3, img_size, img_size, dtype=torch.uint8)
        targets = torch.empty(len(dataset), dtype=torch.long)
        for i in range(len(dataset)):
            image, targets[i] = dataset[i]
            images[i] = to_tensor(image)
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        return cls(images, targets, list(base.classes))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.targets[index]


# ----------------------------------------------------------------------------- datamodule


class ImageDataModule(LightningDataModule):
    """Image classification from an image folder; batches are `(images (B, 3, img_size, img_size),
    targets (B,) int64)` (or `(B, num_classes)` soft targets in training with mixup/cutmix).

    `root=None` uses the embedded digits (written once to the cache, see `prepare_digits`). Any
    other root is an image folder: CIFAR-10 layout (`train/<class>/` only) or ImageNet layout
    (`train/` and `val/`). Without a `val_split` folder, a deterministic stratified `val_fraction`
    of train (seeded by `seed`) is held out for validation. `test_split=None` tests on the
    validation split. `predict_root` is a folder of images (recursively, no class folders): predict
    batches are `(images, paths)`, and the classifier writes its `path,label,probability` CSV to
    `predictions_path`.

    `source` reads other formats under `root` (`datamodules.image_sources`): `cifar10`/`cifar100` python
    batches, `mnist`/`fashion_mnist` files (torchvision, never downloaded), `hf` (a Hugging Face
    `save_to_disk` folder or parquet with image and label columns); their splits are `train` and `test`
    (or the saved ones), so validation is carved from train as above and `test_split: test` tests on the
    official test set. Images of every source become RGB.

    `num_classes` and `classes` are known right after `__init__` (the class folders are listed
    there), so configs and modules can check them before any data is loaded. `mean`/`std` unset:
    the training network's `pretrained_cfg` statistics (timm models, fine-tuning), else 0.5.

    `in_memory=True` is for small-image data sets (CIFAR, the digits): every split is decoded once
    into a uint8 tensor (`InMemoryImages`) and the loader only indexes it, while crops, flips,
    normalisation and mixup/cutmix run on whole batches on the training device
    (`on_after_batch_transfer`). No JPEG decoding or per-image transforms per epoch, so no loader
    workers are needed; RandAugment and random erasing are per-image and need `in_memory=False`.
    """

    in_chans = 3  # HViTDataset converts every image to RGB

    def __init__(
        self,
        root: str | None = None,
        img_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        train_split: str = "train",
        val_split: str | None = "val",
        test_split: str | None = None,
        predict_root: str | None = None,
        predictions_path: str | None = "predictions.csv",
        val_fraction: float = 0.1,
        seed: int = 0,
        skip_corrupt: bool = False,
        random_resized_crop: bool = False,
        crop_scale: tuple[float, float] = (0.35, 1.0),
        hflip: bool = False,
        randaugment: bool = False,
        randaugment_magnitude: int = 9,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        in_memory: bool = False,
        source: str = "folder",
    ) -> None:
        super().__init__()
        check_source(source)
        if source != "folder" and root is None:
            raise ValueError(f"source={source!r} reads files under root: set data.init_args.root (root=None is the "
                             f"embedded digits, an image folder)")
        for name, value in (("img_size", img_size), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale!r}")
        if not 0 <= random_erasing <= 1:
            raise ValueError(f"random_erasing is a probability in [0, 1], got {random_erasing!r}")
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {value!r}")
        if (mean is None) != (std is None):
            raise ValueError(f"set mean and std together (or neither: the network's pretrained_cfg, else 0.5), "
                             f"got mean={mean!r} std={std!r}")
        if mean is not None and (len(mean) != 3 or len(std) != 3 or min(std) <= 0):
            raise ValueError(f"mean and std need 3 values (RGB) and std > 0, got mean={mean!r} std={std!r}")
        if in_memory and (randaugment or random_erasing > 0):
            raise ValueError("in_memory=True augments whole batches on the device and supports random_resized_crop, "
                             "hflip, mixup and cutmix; randaugment and random_erasing need in_memory=False")
        self.save_hyperparameters()
        self.in_memory = in_memory
        self.root, self.img_size, self.batch_size, self.num_workers = root, img_size, batch_size, num_workers
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.predict_root, self.predictions_path = predict_root, predictions_path
        self.val_fraction, self.seed = val_fraction, seed
        self.skip_corrupt = skip_corrupt
        self.mean, self.std = (tuple(mean), tuple(std)) if mean is not None else (None, None)
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.source, self._opened = source, {}
        self.classes: list[str] = (DIGITS_CLASSES if root is None else find_classes(root, train_split)
                                   if source == "folder" else self._open(train_split).classes)
        # one mixer for the run: in the loader's collate, or per batch on the device with in_memory
        self.mix = (MixupCutmixCollate(len(self.classes), mixup_alpha, cutmix_alpha)
                    if mixup_alpha > 0 or cutmix_alpha > 0 else None)
        self.augment = dict(random_resized_crop=random_resized_crop, crop_scale=tuple(crop_scale),
                            hflip=hflip, randaugment=randaugment, randaugment_magnitude=randaugment_magnitude,
                            random_erasing=random_erasing)
        self.train_dataset = self.val_dataset = self.test_dataset = self.predict_dataset = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def data_root(self) -> Path:
        return prepare_digits() if self.root is None else Path(self.root)

    def prepare_data(self) -> None:
        if self.root is None:
            prepare_digits()  # once per node; idempotent and safe against racing ranks anyway

    def resolve_normalisation(self) -> None:
        """mean/std not set: the training network's `pretrained_cfg` (timm models and presets carry the
        statistics their weights were trained with), else 0.5 per channel."""
        if self.mean is not None:
            return
        net = getattr(getattr(self.trainer, "lightning_module", None), "net", None) if self.trainer else None
        cfg = getattr(net, "pretrained_cfg", None) or {}
        if len(cfg.get("mean", ())) == 3 and len(cfg.get("std", ())) == 3:
            self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
            rank_zero_info(f"normalising with the network's pretrained_cfg: mean={self.mean}, std={self.std}")
        else:
            self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def setup(self, stage: str | None = None) -> None:
        self.resolve_normalisation()
        eval_tf = eval_transform(self.img_size, self.mean, self.std)
        if stage == "predict":
            if self.predict_root is None:
                raise ValueError("predict needs a folder of images: set data.init_args.predict_root")
            self.predict_dataset = ImageFiles(self.predict_root, eval_tf, skip_corrupt=self.skip_corrupt)
            return
        if self.train_dataset is None:
            self.train_dataset, self.val_dataset = self._train_val(eval_tf)
        if stage == "test":
            if self.test_split is None:
                rank_zero_info("test_split is None: testing on the validation split")
                self.test_dataset = self.val_dataset
            else:
                self.test_dataset = self._split(self.test_split, None if self.in_memory else eval_tf)
                if self.in_memory:
                    self.test_dataset = InMemoryImages.decode(self.test_dataset, self.img_size)

    def _open(self, split: str) -> LabelledImages:
        """A non-folder source's split, read once (CIFAR batches are unpickled whole)."""
        if split not in self._opened:
            self._opened[split] = open_split(self.source, self.root, split)
        return self._opened[split]

    def _has_split(self, split: str | None) -> bool:
        if split is None:
            return False
        if self.source == "folder":
            return (self.data_root / split).is_dir()
        return has_split(self.source, self.root, split)

    def _split(self, split: str, transform) -> Dataset:
        if self.source == "folder":
            dataset = HViTDataset(self.data_root, transform, split, skip_corrupt=self.skip_corrupt)
        else:
            opened = self._open(split)
            dataset = LabelledImages(opened.image, opened.targets, opened.classes, transform)
        if dataset.classes != self.classes:
            raise ValueError(f"split {split!r} of {str(self.data_root)!r} has classes {dataset.classes}, but "
                             f"{self.train_split!r} has {self.classes}: every split needs the same "
                             f"{'folders' if self.source == 'folder' else 'classes'}")
        return dataset

    def _train_val(self, eval_tf) -> tuple[Dataset, Dataset]:
        if self.in_memory:  # PIL images from the folders, decoded once; augmented per batch on the device
            train, val = self._folders(None, None)
            return InMemoryImages.decode(train, self.img_size), InMemoryImages.decode(val, self.img_size)
        return self._folders(train_transform(self.img_size, mean=self.mean, std=self.std, **self.augment), eval_tf)

    def _folders(self, train_tf, eval_tf) -> tuple[Dataset, Dataset]:
        train = self._split(self.train_split, train_tf)
        if self._has_split(self.val_split):
            return train, self._split(self.val_split, eval_tf)
        # no val folder: hold out a stratified slice of train, read with the eval transform
        train_idx, val_idx = stratified_split(train.targets, self.val_fraction, self.seed)
        val = self._split(self.train_split, eval_tf)
        rank_zero_info(f"no {self.val_split!r} split under {str(self.data_root)!r}: holding out "
                       f"{len(val_idx)} of {len(train)} {self.train_split!r} images as validation "
                       f"(val_fraction={self.val_fraction}, stratified, seed={self.seed})")
        return Subset(train, train_idx), Subset(val, val_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """With `in_memory`: uint8 batches -> float, augmented (training only, under the RNG seeded with
        the batch's seed) and normalised."""
        if not self.in_memory or self.trainer is None or self.trainer.predicting:
            return batch
        images, targets, *seed = batch
        images = images.float() / 255
        training = self.trainer.training
        with seeded_rng(int(seed[0]) if seed and training else None, images.device):
            if training:
                if self.augment["random_resized_crop"]:
                    images = random_resized_crop_flip(images, self.augment["crop_scale"], hflip=self.augment["hflip"])
                elif self.augment["hflip"]:
                    images = random_hflip(images)
            images = v2.functional.normalize(images, list(self.mean), list(self.std))
            if training and self.mix is not None:
                images, targets = self.mix.mix(images, targets)
        return images, targets

    def _loader(self, dataset: Dataset, sampler: DistributedSampler, collate: Callable | None = None) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        """Seeded order, resumable mid-epoch (`resumable_sampler`), and seeded augmentation (`SeededItems`)."""
        sampler = resumable_sampler(self.train_dataset, self.trainer, self.batch_size, seed=self.seed)
        collate = SeededCollate(None if self.in_memory else self.mix, keep_seed=self.in_memory)
        return self._loader(SeededItems(self.train_dataset, self.seed), sampler, collate)

    # val/test/predict: every image exactly once over DDP ranks (Lightning's DistributedSampler pads by
    # repeating images, which would bias accuracy and duplicate predictions)
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, ShardSampler(self.val_dataset))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, ShardSampler(self.test_dataset))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset, ShardSampler(self.predict_dataset))
