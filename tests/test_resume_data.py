"""A run resumed from a checkpoint continues the data stream of an uninterrupted run (order and worker seeds)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from datamodules.base import EpochShuffleSampler, SplitDataModule


class _Noisy(Dataset):
    """Item ``i``: its index and a random draw (an augmentation's randomness)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "noise": torch.rand(())}


class _Data(SplitDataModule):
    num_workers, pin_memory, persistent_workers = 1, False, False

    def setup(self, stage: str) -> None:
        self.datasets["train"] = _Noisy()

    def train_dataloader(self):
        return self._loader("train", True, 4)


class _Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.seen: list[tuple[int, list[int], list[float]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["index"].tolist(), [round(float(v), 6) for v in batch["noise"]]))
        return self.layer(batch["noise"][:, None].float()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _ScheduledRecorder(_Recorder):
    """As oct3d's Lightning modules configure their optimizers: with the run-long warm-up + cosine schedule."""

    def configure_optimizers(self):
        from oct3d.lightning.modules import warmup_cosine_schedule

        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        return {"optimizer": optimizer, "lr_scheduler": warmup_cosine_schedule(optimizer, self.trainer, 1.0, 0.1, 0.0)}


def _fit(root, epochs: int, ckpt_path=None, module=_Recorder) -> list:
    pl.seed_everything(3, workers=True)
    model = module()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root),
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(root), save_last=True)])
    trainer.fit(model, datamodule=_Data(), ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("module", [_Recorder, _ScheduledRecorder])
def test_resuming_continues_the_order_and_worker_seeds_of_an_uninterrupted_run(tmp_path, module):
    """With a worker process; the scheduled module's schedule must not size the train loader before the
    resumed loops are restored (that replayed the first epoch's order and worker seeds)."""
    whole = _fit(tmp_path / "whole", 3, module=module)
    _fit(tmp_path / "part", 1, module=module)
    resumed = _fit(tmp_path / "part", 3, ckpt_path=str(tmp_path / "part" / "last.ckpt"), module=module)
    assert [s for s in whole if s[0] >= 1] == resumed
    # Epochs differ from each other (not one order replayed).
    orders = {tuple(i for s in whole if s[0] == e for i in s[1]) for e in range(3)}
    assert len(orders) == 3


def test_epoch_shuffle_sampler_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(10, seed=1, epoch=2), EpochShuffleSampler(10, seed=1)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(10)) and len(a) == 10
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(EpochShuffleSampler(10, seed=2, epoch=2)) != list(a)

