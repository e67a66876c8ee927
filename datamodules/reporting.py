"""Once-per-epoch report of unreadable videos, read from the batches themselves.

Datasets replace an unreadable video with another one and put ``"path: reason"`` in the batch's
``failed`` list. Because that information travels inside the batch, the report is right however many
DataLoader worker processes decoded the videos (and, gathered across ranks, under DDP).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["DataErrorReport", "EpochFailures", "format_failures", "replacement_indices"]

log = logging.getLogger("lightning.pytorch.datamodules")


def _split_failure(entry: str) -> tuple[str, str]:
    # The reason may itself contain ": " ("cannot open: ..."), so split at the first one.
    path, separator, reason = entry.partition(": ")
    return (path, reason) if separator else (entry, "unreadable")


def format_failures(
    failures: Iterable[str], what: str = "this epoch", limit: int = 10, noun: tuple[str, str] = ("video", "videos"),
    adjective: str = "unreadable",
) -> str:
    """One line: ``"3 unreadable videos this epoch: a.mp4 (truncated ...), b.mp4 (file not found), ..."``.

    Args:
        failures: ``"path: reason"`` strings (duplicates are counted once).
        what: words after the count.
        limit: at most this many videos are named; the rest are counted.
        noun: singular and plural of what failed (volume data says ``("volume", "volumes")``).
        adjective: what the failed files were (volume data says ``"unusable"``: a readable volume whose
            label holds a value outside the classes failed too).
    """
    unique = sorted(set(failures))
    named = ", ".join(f"{path} ({reason})" for path, reason in map(_split_failure, unique[:limit]))
    more = f", and {len(unique) - limit} more" if len(unique) > limit else ""
    return f"{len(unique)} {adjective} {noun[0] if len(unique) == 1 else noun[1]} {what}: {named}{more}"


@dataclass
class EpochFailures:
    """Unreadable videos met in one stage of one epoch.

    Attributes:
        stage: ``"train"``, ``"validation"``, ``"test"`` or ``"predict"``.
        epoch: the trainer's epoch.
        failures: unique ``"path: reason"`` strings, sorted.
    """

    stage: str
    epoch: int
    failures: list[str] = field(default_factory=list)


def _failed_entries(batch: Any) -> list[str]:
    if isinstance(batch, dict):
        failed = batch.get("failed")
        if isinstance(failed, (list, tuple)):
            return [entry for entry in failed if isinstance(entry, str) and entry]
    return []


def _gather(entries: set[str], trainer: pl.Trainer) -> set[str]:
    """Union of every rank's entries (a collective: all ranks reach the same epoch-end hook)."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, sorted(entries))
        return {entry for rank_entries in gathered for entry in (rank_entries or [])}
    return entries


class DataErrorReport(pl.Callback):
    """Print once per epoch how many videos could not be read, and which.

    Reads ``batch["failed"]`` in the batch-end hooks of training, validation, testing and prediction and, at each
    epoch end where something failed, logs one line on the ``lightning.pytorch`` logger (rank zero), e.g.
    ``"2 unreadable videos this epoch (train, epoch 0): a.mp4 (truncated: ...), b.mp4 (file not found)"``.
    Every report is also kept in :attr:`history` as :class:`EpochFailures`.

    Args:
        limit: at most this many videos are named per line.
        skip_sanity_check: do not report the validation sanity check (its videos are reported by the
            first validation epoch anyway).
    """

    def __init__(self, limit: int = 10, skip_sanity_check: bool = True) -> None:
        super().__init__()
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.skip_sanity_check = skip_sanity_check
        self.history: list[EpochFailures] = []
        self._current: dict[str, set[str]] = {"train": set(), "validation": set(), "test": set(), "predict": set()}

    def _collect(self, stage: str, batch: Any) -> None:
        self._current[stage].update(_failed_entries(batch))

    def _report(self, stage: str, trainer: pl.Trainer) -> None:
        entries = _gather(self._current[stage], trainer)
        self._current[stage] = set()
        if not entries:
            return
        record = EpochFailures(stage, trainer.current_epoch, sorted(entries))
        self.history.append(record)
        if trainer.is_global_zero:
            # A data module may name what its files are and how they failed (volume data: "unusable volumes").
            datamodule = getattr(trainer, "datamodule", None)
            noun = getattr(datamodule, "data_error_noun", None) or ("video", "videos")
            adjective = getattr(datamodule, "data_error_adjective", None) or "unreadable"
            log.info(format_failures(entries, f"this epoch ({stage}, epoch {record.epoch})", self.limit, noun,
                                     adjective))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start a fresh training count."""
        self._current["train"] = set()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Collect the failures of a training batch."""
        self._collect("train", batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report the training epoch's failures."""
        self._report("train", trainer)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start a fresh validation count."""
        self._current["validation"] = set()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Collect the failures of a validation batch."""
        if not (self.skip_sanity_check and trainer.sanity_checking):
            self._collect("validation", batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report the validation epoch's failures."""
        if not (self.skip_sanity_check and trainer.sanity_checking):
            self._report("validation", trainer)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start a fresh test count."""
        self._current["test"] = set()

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Collect the failures of a test batch."""
        self._collect("test", batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report the test run's failures."""
        self._report("test", trainer)

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start a fresh prediction count."""
        self._current["predict"] = set()

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Collect the failures of a prediction batch."""
        self._collect("predict", batch)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report the prediction run's failures."""
        self._report("predict", trainer)


def replacement_indices(index: int, count: int, seed: int, limit: int | None = None) -> Iterator[int]:
    """Indices to try, in order, in place of an unreadable item ``index`` of a ``count``-item dataset.

    A seeded stride coprime with ``count`` visits every other item once (at most ``limit`` of them),
    so a replacement is deterministic per item and epoch seed, and no item is tried twice.
    """
    rng = random.Random(seed * 1_000_003 + index)
    step = rng.randrange(1, count) if count > 1 else 1
    while math.gcd(step, count) != 1:
        step = rng.randrange(1, count)
    candidate = index
    tries = count - 1 if limit is None else min(count - 1, limit)
    for _ in range(tries):
        candidate = (candidate + step) % count
        yield candidate
