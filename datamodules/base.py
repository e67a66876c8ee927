"""What the image and video data modules share: dict datasets per split and their loaders."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochShuffleSampler", "SplitDataModule"]

# The Lightning stage whose ``setup`` builds each split's dataset.
_STAGE_OF_SPLIT = {"train": "fit", "val": "validate", "test": "test"}


class EpochShuffleSampler(Sampler[int]):
    """A random order of ``size`` items that depends only on ``(seed, epoch)``.

    PyTorch's shuffling draws from the process's random state, which a run resumed from a checkpoint
    restarts from ``seed_everything``: the resumed epochs would replay the first epochs' order and,
    through the workers' seeds, their augmentations. Here epoch ``e`` of every run with the same seed has
    the same order, and :attr:`loader_generator` (given to the ``DataLoader``, which draws its workers'
    base seed from it) is reseeded alike, so resuming at an epoch boundary continues the uninterrupted
    stream. Lightning calls :meth:`set_epoch` each epoch (and forwards it under DDP's sampler wrapper).
    """

    def __init__(self, size: int, seed: int = 0, epoch: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.loader_generator = torch.Generator()
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order (and its worker seeds)."""
        self.epoch = epoch
        self.loader_generator.manual_seed(self._epoch_seed(1))

    def _epoch_seed(self, stream: int) -> int:
        return (self.seed * 1_000_003 + self.epoch * 2 + stream) % (2**63 - 1)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self._epoch_seed(0)))
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.size


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
        sampler = None
        if shuffle:
            # A resumed run's first epoch must shuffle (and seed its workers) as that epoch did in an
            # uninterrupted run. Lightning creates that epoch's iterator (and workers prefetch from it)
            # before its set_epoch call, so the sampler starts at the restored loop's epoch: the count
            # Lightning itself hands set_epoch (a checkpoint written at an epoch's end still counts that
            # epoch as not completed, so trainer.current_epoch would be one behind).
            trainer = getattr(self, "trainer", None)
            epoch = trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0
            # The run's seed (seed_everything); without one, the process's own random seed, as unseeded
            # PyTorch shuffling is random per run.
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
            sampler = EpochShuffleSampler(len(self.datasets[split]), seed, epoch)
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=None if sampler is not None else False,
            sampler=sampler,
            generator=None if sampler is None else sampler.loader_generator,
            num_workers=self.num_workers,
            # Pinning only helps a copy to a GPU.
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=drop_last,
            collate_fn=collate_fn,
        )
