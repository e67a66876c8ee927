"""OctCLI's checkpointing: ``last.ckpt`` is always the latest state; ``--ckpt_path last|best`` find earlier runs."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from oct3d.lightning.checkpoints import LatestCheckpoint, resolve_checkpoint_path


class _ConstantMetric(pl.LightningModule):
    """A tiny model whose validation metric never improves after the first epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/top1", 0.5)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)

    val_dataloader = train_dataloader


def _fit(root: Path, callback: ModelCheckpoint, epochs: int = 3, **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs, default_root_dir=root, callbacks=[callback], enable_progress_bar=False,
        enable_model_summary=False, logger=False, accelerator="cpu", **trainer_kwargs,
    )
    trainer.fit(_ConstantMetric())
    return trainer


class _ReadLast(pl.Callback):
    """Records the step of last.ckpt at the start of every epoch (what a killed run would resume from)."""

    def __init__(self, path: Path) -> None:
        self.path, self.steps = path, []

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch:
            self.steps.append(torch.load(self.path, weights_only=True)["global_step"])


@pytest.mark.parametrize("val_check_interval", [1.0, 0.5])  # saving at the epoch's end / after each validation
def test_last_checkpoint_is_the_latest_state_when_the_metric_stops_improving(tmp_path, val_check_interval):
    """Lightning 2.6's ModelCheckpoint leaves last.ckpt at the last improvement (step 2 here); ours does not."""
    reader = _ReadLast(tmp_path / "checkpoints" / "last.ckpt")
    callback = LatestCheckpoint(monitor="val/top1", mode="max", save_top_k=1, save_last=True, filename="best")
    trainer = pl.Trainer(
        max_epochs=4, default_root_dir=tmp_path, callbacks=[callback, reader], enable_progress_bar=False,
        enable_model_summary=False, logger=False, accelerator="cpu", val_check_interval=val_check_interval,
    )
    trainer.fit(_ConstantMetric())
    assert reader.steps == [2, 4, 6]  # during the run, after each epoch of 2 batches
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


def test_last_checkpoint_is_written_when_max_steps_ends_between_validations(tmp_path):
    callback = LatestCheckpoint(monitor="val/top1", mode="max", save_top_k=1, save_last=True, filename="best")
    _fit(tmp_path, callback, epochs=5, max_steps=5, check_val_every_n_epoch=2)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_state_key_is_model_checkpoints_so_old_checkpoints_resume():
    args = {"monitor": "val/top1", "mode": "max"}
    assert LatestCheckpoint(**args).state_key == ModelCheckpoint(**args).state_key


def test_last_and_best_resolve_across_version_folders(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    for version, mtime in ((0, 1000), (1, 2000)):
        folder = tmp_path / "lightning_logs" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        for name in ("last.ckpt", f"best-epoch00{version}.ckpt"):
            (folder / name).write_bytes(b"")
            os.utime(folder / name, (mtime, mtime))
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path), callbacks=[LatestCheckpoint()])
    newest = tmp_path / "lightning_logs" / "version_1" / "checkpoints"
    assert resolve_checkpoint_path("last", trainer) == str(newest / "last.ckpt")
    assert resolve_checkpoint_path("best", trainer) == str(newest / "best-epoch001.ckpt")
    assert resolve_checkpoint_path("some/file.ckpt", trainer) == "some/file.ckpt"
    assert resolve_checkpoint_path(None, trainer) is None
    named = tmp_path / "lightning_logs" / "run7" / "checkpoints"  # a logger given a version string
    named.mkdir(parents=True)
    (named / "last.ckpt").write_bytes(b"")
    os.utime(named / "last.ckpt", (3000, 3000))
    assert resolve_checkpoint_path("last", trainer) == str(named / "last.ckpt")
    empty = pl.Trainer(default_root_dir=tmp_path / "new", logger=CSVLogger(tmp_path / "new"))
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path last: no last\*\.ckpt under .*checkpoint.s path"):
        resolve_checkpoint_path("last", empty)



def test_best_resolves_by_the_saved_score_not_the_newest_file(tmp_path):
    """A resumed run's first checkpoint is the newest 'best' but may score worse than the earlier run's."""
    from lightning.pytorch.loggers import CSVLogger

    top1 = ModelCheckpoint(monitor="val/top1", mode="max", filename="best-{epoch:03d}")
    loss = ModelCheckpoint(monitor="val/loss", mode="min", filename="lowest-{epoch:03d}")  # another callback
    for version, mtime, score in ((0, 1000, 0.625), (1, 2000, 0.0)):
        folder = tmp_path / "lightning_logs" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        path = folder / f"best-epoch00{version + 3}.ckpt"
        states = {
            # The loss callback's state comes first and lists other files: it must not rank this one.
            loss.state_key: {"monitor": "val/loss", "best_k_models": {str(folder / "lowest.ckpt"): torch.tensor(0.1)},
                             "current_score": torch.tensor(0.1)},
            top1.state_key: {"monitor": "val/top1", "best_k_models": {str(path): torch.tensor(score)},
                             "current_score": torch.tensor(score)},
        }
        torch.save({"callbacks": states}, path)
        os.utime(path, (mtime, mtime))
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path), callbacks=[loss, top1])
    best = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "best-epoch003.ckpt"
    assert resolve_checkpoint_path("best", trainer) == str(best)
