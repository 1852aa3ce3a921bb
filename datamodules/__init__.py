"""LightningDataModules: byte-level text and image folders."""

from hiertrans.io import cache_dir

from . import hf_text  # noqa: F401  (registers the Hugging Face data-set builders with datamodules.corpus)
from .images import CorruptImageError, HViTDataset, ImageDataModule, ImageFiles, prepare_digits
from .text import ByteTextDataModule

__all__ = ["ByteTextDataModule", "CorruptImageError", "HViTDataset", "ImageDataModule", "ImageFiles",
           "cache_dir", "prepare_digits"]
