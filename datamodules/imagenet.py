"""ImageNet (or any ImageFolder-layout) classification data as a LightningDataModule.

Layout: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG`` (the usual preprocessed ImageNet,
with validation images sorted into class folders). Batches are dicts ``{"image": (B, 3, H, W) float,
"label": (B,) long}``, like the video batches of :class:`datamodules.KineticsDataModule`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2

from .base import SplitDataModule
from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ImageFolderDictDataset",
    "ImageNetDataModule",
    "find_image_classes",
    "imagenet_eval_transform",
    "imagenet_train_transform",
]


def imagenet_train_transform(
    crop_size: int = 224, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> v2.Compose:
    """Standard ImageNet training augmentation: RandomResizedCrop, horizontal flip, float [0, 1], normalize."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(crop_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def imagenet_eval_transform(
    crop_size: int = 224,
    resize_size: int = 256,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """Standard ImageNet evaluation: short side to ``resize_size``, center crop ``crop_size``, normalize."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize_size, antialias=True),
            v2.CenterCrop(crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def find_image_classes(split_dir: str | os.PathLike) -> list[str]:
    """Sorted class folder names of an ImageFolder split (the order ImageFolder uses for labels)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} not found (expected class folders of images)")
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise ValueError(f"{split_dir} has no class folders")
    return classes


class ImageFolderDictDataset(Dataset):
    """An ImageFolder whose items are dicts ``{"image": tensor, "label": int}``.

    Args:
        split_dir: folder of class folders.
        transform: PIL image -> tensor.
        class_names: label vocabulary; class folders are mapped through it so that train and val
            agree even when one of them lacks a class.
    """

    def __init__(self, split_dir: str | os.PathLike, transform, class_names: list[str]) -> None:
        class_index = {name: i for i, name in enumerate(class_names)}
        folder = datasets.ImageFolder(os.fspath(split_dir))
        unknown = sorted(set(folder.classes) - set(class_index))
        if unknown:
            raise ValueError(f"{split_dir}: class folders not among the train classes: {unknown[:5]}")
        self.samples = [(path, class_index[folder.classes[label]]) for path, label in folder.samples]
        self.loader = folder.loader
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        return {"image": self.transform(self.loader(path)), "label": label}


class ImageNetDataModule(SplitDataModule):
    """LightningDataModule for ImageFolder-layout image classification (ImageNet recipe by default).

    Args:
        root: dataset root with ``train/`` and ``val/`` class folders.
        batch_size: batch size per process.
        num_workers: DataLoader worker processes.
        crop_size: training RandomResizedCrop size and evaluation center-crop size.
        resize_size: evaluation short-side size before the center crop.
        pin_memory: pin batches in page-locked memory (for GPU training).
        eval_batch_size: batch size of validation/test loaders (default: ``batch_size``).
        persistent_workers: keep workers alive between epochs.
        drop_last: drop the last incomplete training batch.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        num_workers: int = 8,
        crop_size: int = 224,
        resize_size: int = 256,
        pin_memory: bool = True,
        eval_batch_size: int | None = None,
        persistent_workers: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("crop_size", crop_size), ("resize_size", resize_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if resize_size < crop_size:
            raise ValueError(f"resize_size ({resize_size}) must be >= crop_size ({crop_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be a positive int or None, got {eval_batch_size!r}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.drop_last = drop_last
        self._class_names: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        """Class folder names of ``root/train`` in label order (works before ``setup()``)."""
        if self._class_names is None:
            self._class_names = find_image_classes(self.root / "train")
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes (works before ``setup()``)."""
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        """Build the train dataset (``fit``) and the val dataset (``fit``, ``validate``, ``test``, ``predict``)."""
        if stage in ("fit", None) and "train" not in self.datasets:
            self.datasets["train"] = ImageFolderDictDataset(
                self.root / "train", imagenet_train_transform(self.crop_size), self.class_names
            )
        if "val" not in self.datasets:
            self.datasets["val"] = ImageFolderDictDataset(
                self.root / "val", imagenet_eval_transform(self.crop_size, self.resize_size), self.class_names
            )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training images."""
        return self._loader("train", True, self.batch_size, self.drop_last)

    def val_dataloader(self) -> DataLoader:
        """Resized, center-cropped validation images."""
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """The validation images (ImageNet has no public labelled test set)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The validation images."""
        return self.val_dataloader()
