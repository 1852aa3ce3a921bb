"""Image folders for classification: `HViTDataset`, the embedded digits default and `ImageDataModule`.

Layout read everywhere (torchvision's ImageFolder layout, one folder per split):

    root/<split>/<class>/<image>          e.g. root/train/cat/0001.jpg, root/val/cat/0042.jpg

The default data set is scikit-learn's bundled handwritten digits (1,797 real 8x8 grayscale images,
no download), written once as such a folder into a cache directory, so the default run goes
through exactly the code path a user's data does.
"""

import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision.transforms import v2

from hiertrans.io import atomic_directory, cache_dir

from .text import ShardSampler

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DIGITS_CLASSES = [str(d) for d in range(10)]
DIGITS_VAL_SIZE = 360  # of 1,797: 1,437 train / 360 val, stratified, fixed seed
DIGITS_SEED = 0


class CorruptImageError(ValueError):
    """An image file that PIL cannot open or decode; the message names the file."""


# ----------------------------------------------------------------------------- file listing


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".")


def list_images(directory: Path) -> list[Path]:
    """All image files under `directory` (recursively), sorted so that indices are deterministic."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and is_image_file(p))


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


def load_rgb(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB; CorruptImageError naming the file when that fails."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() decodes, so truncated files fail here, not later
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(f"cannot read image file {str(path)!r}: {exc}") from exc


# ----------------------------------------------------------------------------- data sets


class HViTDataset(Dataset):
    """Labelled images from `root/<split>/<class>/<image>`.

    Classes are the sorted subfolder names of the split (`classes`, `class_to_idx`); `samples` is
    the sorted list of `(path, class index)`, `targets` the class indices alone. Items are
    `(transform(image), target)` where the image is a PIL RGB image (3 channels whatever the file
    holds; grayscale files are replicated) unless `transform` turns it into a `(3, H, W)` tensor.

    Corrupt files are detected lazily, when an item is loaded (a full scan of 50k JPEGs at start-up
    would cost minutes): by default loading one raises `CorruptImageError` naming the file; with
    `skip_corrupt=True` a warning names it and the next readable sample is returned instead.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, split: str = "train",
                 skip_corrupt: bool = False) -> None:
        self.root, self.split, self.transform, self.skip_corrupt = Path(root), split, transform, skip_corrupt
        self.classes = find_classes(root, split)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        directory = self.root / split
        self.samples: list[tuple[str, int]] = []
        empty = []
        for name in self.classes:
            files = list_images(directory / name)
            if not files:
                empty.append(name)
            self.samples += [(str(f), self.class_to_idx[name]) for f in files]
        if empty:
            raise ValueError(f"split folder {str(directory)!r}: class folders without images "
                             f"(extensions {', '.join(IMG_EXTENSIONS)}): {empty}")
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
    """Unlabelled images under `root`, recursively (no class folders needed): items `(image, path)`."""

    def __init__(self, root: str | Path, transform: Callable | None = None) -> None:
        self.root, self.transform = Path(root), transform
        if not self.root.is_dir():
            raise ValueError(f"predict_root {str(root)!r} does not exist or is not a directory")
        self.files = [str(p) for p in list_images(self.root)]
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

    `num_classes` and `classes` are known right after `__init__` (the class folders are listed
    there), so configs and modules can check them before any data is loaded.

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
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        in_memory: bool = False,
    ) -> None:
        super().__init__()
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
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
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
        self.skip_corrupt, self.mean, self.std = skip_corrupt, tuple(mean), tuple(std)
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.classes: list[str] = DIGITS_CLASSES if root is None else find_classes(root, train_split)
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

    def setup(self, stage: str | None = None) -> None:
        eval_tf = eval_transform(self.img_size, self.mean, self.std)
        if stage == "predict":
            if self.predict_root is None:
                raise ValueError("predict needs a folder of images: set data.init_args.predict_root")
            self.predict_dataset = ImageFiles(self.predict_root, eval_tf)
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

    def _split(self, split: str, transform) -> HViTDataset:
        dataset = HViTDataset(self.data_root, transform, split, skip_corrupt=self.skip_corrupt)
        if dataset.classes != self.classes:
            raise ValueError(f"split {split!r} of {str(self.data_root)!r} has classes {dataset.classes}, but "
                             f"{self.train_split!r} has {self.classes}: every split needs the same folders")
        return dataset

    def _train_val(self, eval_tf) -> tuple[Dataset, Dataset]:
        if self.in_memory:  # PIL images from the folders, decoded once; augmented per batch on the device
            train, val = self._folders(None, None)
            return InMemoryImages.decode(train, self.img_size), InMemoryImages.decode(val, self.img_size)
        return self._folders(train_transform(self.img_size, mean=self.mean, std=self.std, **self.augment), eval_tf)

    def _folders(self, train_tf, eval_tf) -> tuple[Dataset, Dataset]:
        train = self._split(self.train_split, train_tf)
        if self.val_split is not None and (self.data_root / self.val_split).is_dir():
            return train, self._split(self.val_split, eval_tf)
        # no val folder: hold out a stratified slice of train, read with the eval transform
        train_idx, val_idx = stratified_split(train.targets, self.val_fraction, self.seed)
        val = HViTDataset(self.data_root, eval_tf, self.train_split, skip_corrupt=self.skip_corrupt)
        rank_zero_info(f"no {self.val_split!r} split under {str(self.data_root)!r}: holding out "
                       f"{len(val_idx)} of {len(train)} {self.train_split!r} images as validation "
                       f"(val_fraction={self.val_fraction}, stratified, seed={self.seed})")
        return Subset(train, train_idx), Subset(val, val_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """With `in_memory`: uint8 batches -> float, augmented (training only) and normalised."""
        if not self.in_memory or self.trainer is None or self.trainer.predicting:
            return batch
        images, targets = batch
        images = images.float() / 255
        if self.trainer.training:
            if self.augment["random_resized_crop"]:
                images = random_resized_crop_flip(images, self.augment["crop_scale"], hflip=self.augment["hflip"])
            elif self.augment["hflip"]:
                images = random_hflip(images)
        images = v2.functional.normalize(images, list(self.mean), list(self.std))
        if self.trainer.training and self.mix is not None:
            images, targets = self.mix.mix(images, targets)
        return images, targets

    def _loader(self, dataset: Dataset, train: bool = False) -> DataLoader:
        collate = self.mix if train and not self.in_memory else None
        # val/test/predict: every image exactly once over DDP ranks (Lightning's DistributedSampler pads
        # by repeating images, which would bias accuracy and duplicate predictions)
        sampler = None if train else ShardSampler(dataset)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=collate, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset)
