"""``OctCLI``: the ``LightningCLI`` behind ``lightning fit|validate|test|predict`` and ``oct3d fit|...``.

On top of the stock CLI it links ``data.num_classes`` into ``model.init_args.num_classes`` (so any
Kinetics-layout dataset works without editing a config), keeps the best checkpoint by ``val/top1``
plus the last one (``--checkpoint.*`` configures it), adds a rich progress bar and the data
modules' unreadable-file report, and overwrites the saved ``config.yaml`` on reruns.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["OctCLI", "run_cli"]


def _data_error_callbacks() -> list[Callback]:
    """The data package's once-per-epoch report of unreadable files, when that package provides it."""
    try:
        from datamodules import DataErrorReport
    except ImportError:
        return []
    return [DataErrorReport()]


class OctCLI(LightningCLI):
    """LightningCLI for octave models (classifiers, the volume segmenter); ``model`` and ``data`` are chosen by
    ``class_path`` in the config."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the class count from data to model, and expose the checkpoint callback as ``--checkpoint.*``."""
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/top1",
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}-top1{val/top1:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        extra: list[Callback] = [*_data_error_callbacks()]
        given = [c for c in (config.get("callbacks") or []) + callbacks if isinstance(c, Callback)]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            extra.append(RichProgressBar())
        has_logger = config.get("logger", True) not in (False, None)
        if has_logger and not any(isinstance(c, LearningRateMonitor) for c in given):
            extra.append(LearningRateMonitor(logging_interval="step"))
        return super()._instantiate_trainer(config, callbacks + extra)


def run_cli(args: list[str] | None = None) -> int:
    """Run ``OctCLI`` on ``args`` (``sys.argv[1:]`` when None); returns 0 (errors exit through argparse).

    Applies :func:`oct3d.system.steady_malloc` first (``OCT3D_STEADY_MALLOC=0`` turns it off): clips and
    volumes are large tensors that default glibc malloc page-faults in again every step.
    """
    from oct3d.system import steady_malloc_unless_disabled

    steady_malloc_unless_disabled()
    OctCLI(args=args)
    return 0
