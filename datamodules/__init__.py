"""LightningDataModules: byte-level text and image folders."""

from .images import CorruptImageError, HViTDataset, ImageDataModule, ImageFiles, cache_dir, prepare_digits
from .text import ByteTextDataModule

__all__ = ["ByteTextDataModule", "CorruptImageError", "HViTDataset", "ImageDataModule", "ImageFiles",
           "cache_dir", "prepare_digits"]
