"""LightningDataModules: byte-level text and image folders."""

from .text import ByteTextDataModule

__all__ = ["ByteTextDataModule"]
