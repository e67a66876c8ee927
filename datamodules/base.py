"""What the image and video data modules share: dict datasets per split and their loaders."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["SplitDataModule"]

# The Lightning stage whose ``setup`` builds each split's dataset.
_STAGE_OF_SPLIT = {"train": "fit", "val": "validate", "test": "test"}


class SplitDataModule(pl.LightningDataModule):
    """A data module holding one dataset per split in ``self.datasets`` and loading them alike.

    Subclasses set ``num_workers``, ``pin_memory`` and ``persistent_workers`` and build
    ``self.datasets[split]`` in ``setup``.
    """

    num_workers: int
    pin_memory: bool
    persistent_workers: bool

    def __init__(self) -> None:
        super().__init__()
        self.datasets: dict[str, Dataset] = {}

    def _loader(
        self, split: str, shuffle: bool, batch_size: int, drop_last: bool = False, collate_fn: Callable | None = None
    ) -> DataLoader:
        if split not in self.datasets:
            self.setup(_STAGE_OF_SPLIT[split])
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            # Pinning only helps a copy to a GPU.
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=drop_last,
            collate_fn=collate_fn,
        )
