"""Checkpointing for ``OctCLI``: a ``last.ckpt`` that is always the latest state, and ``--ckpt_path
last|best`` that find the previous run's checkpoints.

Lightning 2.6's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only in a validation where
a top-k checkpoint was also saved, so after epochs that do not improve the monitored metric
``last.ckpt`` is older than the run, and resuming from it repeats epochs. :class:`LatestCheckpoint`
writes it after every validation (and at the end of training).

Every ``lightning fit`` logs into a new ``version_N`` folder, where Lightning looks for ``last``
and, in a new process, knows no ``best``: :func:`resolve_checkpoint_path` looks through the earlier
version folders instead.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["LatestCheckpoint", "resolve_checkpoint_path"]


class LatestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` (``save_last=True``) is rewritten after every validation
    and at the end of training, whether or not a top-k checkpoint was saved there."""

    @property
    def state_key(self) -> str:
        """``ModelCheckpoint``'s own key, so checkpoints written with either class resume with the other."""
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__):]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the top-k checkpoint as ``ModelCheckpoint`` does, then ``last.ckpt`` if it was not saved."""
        super().on_validation_end(trainer, pl_module)
        if (
            self.save_last is True
            and not self._should_skip_saving_checkpoint(trainer)
            and not self._should_save_on_train_epoch_end(trainer)
        ):
            self._save_last_if_stale(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Where saving happens at the epoch's end (Lightning's default with one validation per
        epoch), save the top-k checkpoint as ``ModelCheckpoint`` does, then ``last.ckpt`` if it was not saved."""
        super().on_train_epoch_end(trainer, pl_module)
        if (
            self.save_last is True
            and not self._should_skip_saving_checkpoint(trainer)
            and self._should_save_on_train_epoch_end(trainer)
        ):
            self._save_last_if_stale(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save ``last.ckpt`` at the final step (``max_steps`` can end a run between validations)."""
        super().on_train_end(trainer, pl_module)
        if self.save_last is True and not trainer.sanity_checking and trainer.fast_dev_run is False:
            self._save_last_if_stale(trainer)

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        # A run without validation (a data module holding out no cases) has no metric to rank by:
        # keep last.ckpt only, without Lightning's warning that the metric was never logged.
        if self.monitor is not None and self.monitor not in monitor_candidates and not _validates(trainer):
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_if_stale(self, trainer: pl.Trainer) -> None:
        if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _validates(trainer: pl.Trainer) -> bool:
    """Whether this run has validation batches (False for an empty validation set or ``limit_val_batches=0``)."""
    batches = trainer.num_val_batches
    return bool(batches) and sum(batches) > 0 and trainer.limit_val_batches != 0


def resolve_checkpoint_path(ckpt_path: str | Path | None, trainer: pl.Trainer) -> str | Path | None:
    """``ckpt_path`` with ``"last"`` and ``"best"`` resolved to a file of an earlier run.

    ``"last"``: the newest ``last*.ckpt``; ``"best"``: when this process knows no best
    checkpoint (a new process), the ``best*.ckpt`` with the best score its ModelCheckpoint saved it
    with (the newest one where the files record no comparable score). Looked for in the checkpoint
    callback's ``dirpath`` when it has one, else in every version folder of the first logger
    (``save_dir/name/*/checkpoints``, where Lightning writes them), or in
    ``default_root_dir/checkpoints`` without a logger. Any other value is returned
    unchanged.

    Raises:
        FileNotFoundError: ``"last"``/``"best"`` was asked for and no such file exists (Lightning
            would only warn, and ``fit`` would silently start from scratch).
    """
    if ckpt_path not in ("last", "best"):
        return ckpt_path
    callback = trainer.checkpoint_callback
    if ckpt_path == "best" and getattr(callback, "best_model_path", ""):
        return ckpt_path  # this process trained it: Lightning knows which
    pattern = f"{ckpt_path}*.ckpt"
    if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
        folders = [Path(callback.dirpath)]
        found = list(folders[0].glob(pattern))
    elif trainer.loggers:
        # Lightning writes checkpoints under the first logger: save_dir/name/<version>/checkpoints,
        # the version a "version_N" or any string the logger was given.
        logger = trainer.loggers[0]
        save_dir = getattr(logger, "save_dir", None) or trainer.default_root_dir
        name = getattr(logger, "name", None)
        folders = [Path(save_dir) / name if name else Path(save_dir)]
        found = list(folders[0].glob(f"*/checkpoints/{pattern}"))
    else:
        folders = [Path(trainer.default_root_dir) / "checkpoints"]
        found = list(folders[0].glob(pattern))
    found = [p for p in found if p.is_file()]
    if not found:
        where = ", ".join(str(f) for f in folders)
        raise FileNotFoundError(
            f"--ckpt_path {ckpt_path}: no {pattern} under {where or 'the log folder'}; give the checkpoint's path"
        )
    newest = lambda p: (p.stat().st_mtime, _version_number(p))
    if ckpt_path == "best" and len(found) > 1:
        # By the score each file was saved with, not by age: a resumed run's checkpoint callback starts
        # without the earlier run's best (Lightning does not reload it when the folder changed), so its
        # first, possibly worse, checkpoint is also the newest "best".
        scored = [(saved, p) for p in found if (saved := _saved_score(p)) is not None]
        # Comparable only under one monitor and mode (several checkpoint callbacks may write best* files).
        if scored and len({(monitor, mode) for (_, monitor, mode), _ in scored}) == 1:
            sign = -1.0 if scored[0][0][2] == "min" else 1.0
            return str(max(scored, key=lambda sp: (sign * sp[0][0], newest(sp[1])))[1])
    return str(max(found, key=newest))


def _saved_score(path: Path) -> tuple[float, str, str] | None:
    """``(score, monitor, mode)`` of ``path`` as recorded by the ModelCheckpoint that wrote it: the callback
    state in the file whose top-k list holds the file's name (Lightning records a file there before saving
    it). None when no state names it, or the file cannot be read (it is then ranked by age)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if not isinstance(state, dict):
            continue
        scores = {Path(str(k)).name: v for k, v in (state.get("best_k_models") or {}).items()}
        score = scores.get(path.name)
        if score is not None and math.isfinite(float(score)):
            mode = re.search(r"'mode': '(min|max)'", str(key))  # the state key spells the callback's settings
            return float(score), str(state.get("monitor")), mode.group(1) if mode else "max"
    return None


def _version_number(path: Path) -> int:
    match = re.search(r"version_(\d+)", str(path))
    return int(match.group(1)) if match else -1
