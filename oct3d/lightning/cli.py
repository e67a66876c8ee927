"""``OctCLI``: the ``LightningCLI`` behind ``lightning fit|validate|test|predict`` and ``oct3d fit|...``.

On top of the stock CLI it links ``data.num_classes`` into ``model.init_args.num_classes`` (so any
Kinetics-layout dataset works without editing a config), keeps the best checkpoint by the model's
metric (``val/top1``, or ``val/dice`` for the segmenter) plus a ``last.ckpt`` rewritten after every
validation (``--checkpoint.*`` configures it), resolves ``--ckpt_path last|best`` across earlier runs'
version folders (:mod:`oct3d.lightning.checkpoints`), adds a rich progress bar and the data modules'
unreadable-file report, and overwrites the saved ``config.yaml`` on reruns.
"""

from __future__ import annotations

import importlib
import importlib.util
import linecache
import os
import re
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from oct3d.lightning.checkpoints import LatestCheckpoint, resolve_checkpoint_path

__all__ = ["OctCLI", "run_cli"]

_DEFAULT_MONITOR = "val/top1"


def _checkpoint_filename(monitor: str) -> str:
    """``best-epoch003-top1=0.4567.ckpt`` for ``val/top1``: the epoch and the monitored value."""
    return f"best-epoch{{epoch:03d}}-{monitor.rsplit('/', 1)[-1]}={{{monitor}:.4f}}"


def _class_of(model_config: Any) -> type | None:
    """The class a config's ``model.class_path`` names, or None."""
    class_path = model_config.get("class_path") if hasattr(model_config, "get") else None
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _data_error_callbacks() -> list[Callback]:
    """The data package's once-per-epoch report of unreadable files, when that package provides it."""
    try:
        from datamodules import DataErrorReport
    except ImportError:
        return []
    return [DataErrorReport()]


class _ArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with a one-line usage before an error message.

    jsonargparse prints the usage of every option (about 70 lines for ``fit``) ahead of the one
    line that says what was wrong; ``--help`` still lists them all.
    """

    def print_usage(self, file: Any = None) -> None:
        """``usage: <prog> [-h] [-c CONFIG] [options]``."""
        prog = self.prog.replace(" [options]", "")
        (file or sys.stderr).write(f"usage: {prog} [-h] [-c CONFIG] [options]\n")

    def error(self, message: str, ex: Exception | None = None) -> Any:
        """jsonargparse's error, with an unknown option of a ``class_path`` class said in one line."""
        return super().error(_unknown_option_message(message, self.prog.replace(" [options]", "")), ex)


_UNION_KEY = re.compile(r'Parser key "([\w.]+)":\s+Does not validate against any of the Union subtypes')
_UNKNOWN_OPTION = re.compile(r"Problem with given class_path '([\w.]+)':\s+Option '([\w.]+)' is not accepted")


def _unknown_option_message(message: str, prog: str) -> str:
    """``Parser key "model": ... Option 'foo' is not accepted ...`` (nine lines of union subtypes) as
    ``--model.foo: oct3d.lightning.VideoClassifier takes no option 'foo' (...)``; other messages as they are."""
    key, option = _UNION_KEY.search(message), _UNKNOWN_OPTION.search(message)
    if key is None or option is None:
        return message
    name, class_path = key.group(1), option.group(1)
    return (f"--{name}.{option.group(2)}: {class_path} takes no option '{option.group(2)}' "
            f"(`{prog} --{name}.help {class_path}` lists the ones it takes)")


class OctCLI(LightningCLI):
    """LightningCLI for octave models (classifiers, the volume segmenter); ``model`` and ``data`` are chosen by
    ``class_path`` in the config."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", _ArgumentParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the class count from data to model, and expose the checkpoint callback as ``--checkpoint.*``."""
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(LatestCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": _DEFAULT_MONITOR,
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.filename": _checkpoint_filename(_DEFAULT_MONITOR),
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        """Keep the best checkpoint by the model's own metric (``val/dice`` for the segmenter) when the
        config leaves the monitor at its default, and name the file after the monitored metric."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        checkpoint = config.get("checkpoint")
        if checkpoint is None:
            return
        monitor = checkpoint.get("monitor")
        model_monitor = getattr(_class_of(config.get("model")), "checkpoint_monitor", None)
        if monitor == _DEFAULT_MONITOR and model_monitor and model_monitor != monitor:
            checkpoint.monitor = monitor = model_monitor
        if monitor and checkpoint.get("filename") == _checkpoint_filename(_DEFAULT_MONITOR):
            checkpoint.filename = _checkpoint_filename(monitor)

    def _parse_ckpt_path(self) -> None:
        """Keep the configuration as given for a checkpoint file too, as for ``last``/``best``.

        LightningCLI would replace the model's arguments, command-line overrides included
        (``--model.init_args.lr``), with the hyperparameters stored in a checkpoint file, but not for
        ``last``/``best``, which are files only once :meth:`before_fit` resolves them. The command line
        defines the run either way; the checkpoint restores weights and training state, and oct3d's
        modules check that it holds the same network (:meth:`on_load_checkpoint`).
        """

    def _resolve_ckpt_path(self) -> None:
        # "last"/"best" of an earlier run: every fit logs into a new version folder, where
        # Lightning would look (and, finding nothing, start from scratch with a warning).
        kwargs = self.config_init[self.subcommand]
        if kwargs.get("ckpt_path") in ("last", "best"):
            kwargs["ckpt_path"] = resolve_checkpoint_path(kwargs["ckpt_path"], self.trainer)
            rank_zero_info(f"--ckpt_path resolved to {kwargs['ckpt_path']}")

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last|best`` to the newest such checkpoint of earlier runs."""
        self._resolve_ckpt_path()

    before_validate = before_test = before_fit

    def before_predict(self) -> None:
        """Resolve ``--ckpt_path`` as for fit; say where predictions go when no callback writes them."""
        self._resolve_ckpt_path()
        from lightning.pytorch.callbacks import BasePredictionWriter

        if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            # Trainer.predict returns the predictions to Python; from the command line they would be lost.
            rank_zero_info(
                "lightning predict writes no file unless a prediction writer callback is given "
                "(--trainer.callbacks+=<a BasePredictionWriter>); to write predictions run "
                "`oct3d infer --checkpoint CKPT --output preds.jsonl VIDEOS` (classifiers) or "
                "`oct3d segment --checkpoint CKPT --output-dir DIR VOLUMES` (segmenters)"
            )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        _check_sync_batchnorm(config)
        extra: list[Callback] = [*_data_error_callbacks()]
        given = [c for c in (config.get("callbacks") or []) + callbacks if isinstance(c, Callback)]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            extra.append(RichProgressBar())
        # ``logger: null`` (LightningCLI's default) is the Trainer's default TensorBoard logger.
        logger = config.get("logger")
        has_logger = logger is not False and not (isinstance(logger, (list, tuple)) and not logger)
        if has_logger and not any(isinstance(c, LearningRateMonitor) for c in given):
            extra.append(LearningRateMonitor(logging_interval="step"))
        return super()._instantiate_trainer(config, callbacks + extra)


def _check_sync_batchnorm(config: dict[str, Any]) -> None:
    """Refuse ``sync_batchnorm`` on CPU before the launch: every rank would fail with its own traceback."""
    import torch

    accelerator = config.get("accelerator")
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    if config.get("sync_batchnorm") and on_cpu:
        raise ValueError("--trainer.sync_batchnorm true needs GPUs (SyncBatchNorm runs on CUDA only); on the CPU add "
                         "--trainer.sync_batchnorm false (each process then keeps its own BatchNorm statistics)")


def run_cli(args: list[str] | None = None) -> int:
    """Run ``OctCLI`` on ``args`` (``sys.argv[1:]`` when None); returns 0, or 2 for a refused setting.

    Option errors exit through argparse. A setting that oct3d's own checks refuse (a dataset folder
    without the expected layout, a malformed annotation file, ``--ckpt_path last`` with no earlier
    run, an argument out of range) prints as one ``error:`` line instead of a traceback through
    jsonargparse and Lightning; ``OCT3D_TRACEBACK=1`` keeps the traceback. Any other exception
    propagates unchanged.

    Applies :func:`oct3d.system.steady_malloc` first (``OCT3D_STEADY_MALLOC=0`` turns it off): clips and
    volumes are large tensors that default glibc malloc page-faults in again every step.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from oct3d.system import steady_malloc_unless_disabled

    steady_malloc_unless_disabled()
    try:
        OctCLI(args=args)
    except MisconfigurationException as error:
        # The full-scale configs ask for GPUs; on a machine without one Lightning's message says only that.
        import torch

        # Only where there is no GPU at all: "you requested 8 GPUs but have 1" needs another answer.
        if ("gpu" not in str(error).lower() or torch.cuda.is_available()
                or os.environ.get("OCT3D_TRACEBACK", "").strip() not in ("", "0")):
            raise
        print(f"error: {error} The config asks for GPUs (trainer.accelerator: gpu). To run it on the CPU, add "
              "--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto --trainer.sync_batchnorm false "
              "--trainer.precision 32-true --data.pin_memory false (or start from configs/oct_i3d_demo.yaml)",
              file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as error:
        own = _own_refusal(error)
        if own is None or os.environ.get("OCT3D_TRACEBACK", "").strip() not in ("", "0"):
            raise
        print(f"error: {own}", file=sys.stderr)
        return 2
    return 0


def _own_refusal(error: BaseException) -> BaseException | None:
    """``error``, or the error it was raised from, when that is one of oct3d's own checks (see
    :func:`_refused_by_own_check`); else None. jsonargparse re-raises a class's refused argument as
    "Does not validate against any of the Union subtypes" from the original error."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ValueError, FileNotFoundError, NotADirectoryError)) and _refused_by_own_check(current):
            return current
        current = current.__cause__  # (not __context__: an error raised while handling another is its own)
    return None


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    return None if spec is None or spec.origin is None else str(Path(spec.origin).resolve().parent) + os.sep


_OWN_PACKAGES = tuple(folder for folder in map(_package_dir, ("oct3d", "datamodules")) if folder)


def _refused_by_own_check(error: BaseException) -> bool:
    """Whether ``error`` was raised by a ``raise`` statement of oct3d or its data modules: one of their
    argument and layout checks, whose message says what was expected."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if not str(Path(filename).resolve()).startswith(_OWN_PACKAGES):
        return False
    # The failing line itself is a raise: not a builtin failing inside oct3d code (an unpacking, an open()).
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise ")
