"""Lightning modules for octave classifiers: :class:`VideoClassifier` (clips) and :class:`ImageClassifier` (images).

Both build their backbone by name from :mod:`oct3d.models` (``get_model(backbone, num_classes=...,
**backbone_kwargs)``), train with SGD (momentum) or AdamW under a linear-warmup + cosine schedule
stepped every optimizer step, report top-1/top-5 through torchmetrics, and write everything that
inference needs (backbone name and arguments, class names, preprocessing) into the checkpoint as
plain Python types, so ``torch.load(..., weights_only=True)`` can read it and no config is needed.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from oct3d.models import builder_arguments, get_model
from oct3d.models.transfer import plain_state_dict
from oct3d.nn.conv import check_positive_int
from oct3d.system import foreach_kwargs

__all__ = [
    "CHECKPOINT_KEY",
    "CHECKPOINT_FORMAT_VERSION",
    "OctaveClassifier",
    "VideoClassifier",
    "ImageClassifier",
    "WarmupCosine",
    "check_optimization",
    "foreach_kwargs",
    "record_hparam",
    "warmup_cosine_schedule",
    "apply_scheduled_lr",
    "planned_schedule",
    "steps_per_epoch",
    "remember_position",
    "validation_position",
]

#: Key of the checkpoint entry holding everything inference needs; its presence marks "our" checkpoint.
CHECKPOINT_KEY = "oct3d"
#: Bumped when the layout of ``checkpoint[CHECKPOINT_KEY]`` changes. 2: ``backbone_kwargs`` of a registry
#: name hold every builder argument, defaults included (version 1 held only those given, and
#: ``oct_unet3d``'s default ``base_width`` was then 16).
CHECKPOINT_FORMAT_VERSION = 2

# ImageNet statistics: what the data modules normalise with unless they say otherwise.
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
# Kinetics statistics (pytorchvideo's), the video data modules' default.
_KINETICS_MEAN = [0.45, 0.45, 0.45]
_KINETICS_STD = [0.225, 0.225, 0.225]


class WarmupCosine:
    """LR multiplier per optimizer step: linear warm-up from ``start_factor`` to 1, then cosine to ``min_factor``.

    :func:`warmup_cosine_schedule` hands it to ``LambdaLR`` behind a ``functools.partial``, so a
    checkpoint stores the step count but not these fields: a resumed run plans the curve over its
    own length (the same curve when nothing changed; stretched when, say, ``max_epochs`` was
    raised, instead of staying at the old curve's final rate) and continues at the restored step.
    """

    def __init__(self, warmup_steps: int, total_steps: int, start_factor: float = 0.01, min_factor: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.start_factor = float(start_factor)
        self.min_factor = float(min_factor)

    def __call__(self, step: int) -> float:
        """The multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_optimization(optimizer: str, lr: float, warmup_epochs: float) -> None:
    """Validate the optimisation arguments the Lightning modules share, naming the bad one."""
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")


def record_hparam(module: pl.LightningModule, key: str, value: Any) -> None:
    """Set hyperparameter ``key`` after ``save_hyperparameters``, in ``hparams`` (the checkpoint) and in
    ``hparams_initial`` (what loggers write to ``hparams.yaml``) alike."""
    module.hparams[key] = value
    initial = getattr(module, "_hparams_initial", None)
    if initial is not None:
        initial[key] = copy.deepcopy(value)


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, trainer: pl.Trainer, warmup_epochs: float, start_factor: float,
    min_factor: float,
) -> dict[str, Any]:
    """Lightning's ``lr_scheduler`` entry: :class:`WarmupCosine` stepped per optimizer step over the whole run.

    The curve is planned when it is first needed, from the trainer's epoch length then, not here:
    ``configure_optimizers`` runs before a resumed run restores its loops, and sizing the train
    loader this early (``trainer.estimated_stepping_batches``) would start the first resumed epoch
    with the first epoch's data order and worker seeds.
    """
    # LambdaLR saves a callable object's fields and restores them over the new plan; a partial has none.
    factor = functools.partial(_planned_factor, trainer, float(warmup_epochs), float(start_factor), float(min_factor))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}


def steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps per training epoch, or None before the train loader's length is known."""
    batches = getattr(trainer, "num_training_batches", None)
    if isinstance(batches, (int, float)) and not isinstance(batches, bool) and math.isfinite(batches) and batches > 0:
        return max(math.ceil(batches / trainer.accumulate_grad_batches), 1)
    return None


def _run_steps(trainer: pl.Trainer, per_epoch: int) -> tuple[float, bool]:
    """The run's length in optimizer steps (``inf`` when unbounded), and whether ``max_epochs`` bounds it."""
    max_epochs, max_steps = getattr(trainer, "max_epochs", None), getattr(trainer, "max_steps", -1)
    by_epochs = per_epoch * max_epochs if max_epochs is not None and max_epochs > 0 else math.inf
    by_steps = max_steps if max_steps is not None and max_steps > 0 else math.inf
    return min(by_epochs, by_steps), by_epochs <= by_steps


def planned_schedule(trainer: pl.Trainer, warmup_epochs: float, start_factor: float,
                     min_factor: float) -> WarmupCosine | None:
    """The curve of :func:`warmup_cosine_schedule` over the trainer's run as it stands, in optimizer
    steps; None before the train loader's length is known. An unbounded run warms up, then holds the peak."""
    per_epoch = steps_per_epoch(trainer)
    if per_epoch is None:
        return None
    total, _ = _run_steps(trainer, per_epoch)
    warmup = round(warmup_epochs * per_epoch)
    if not math.isfinite(total):
        return WarmupCosine(warmup, max(warmup, 1), start_factor, 1.0)
    total = max(int(total), 1)
    return WarmupCosine(min(warmup, total), total, start_factor, min_factor)


def _planned_factor(trainer: pl.Trainer, warmup_epochs: float, start_factor: float, min_factor: float,
                    step: int) -> float:
    plan = planned_schedule(trainer, warmup_epochs, start_factor, min_factor)
    if plan is None:  # the scheduler's construction, before the train loader exists: the curve's start
        return start_factor if warmup_epochs > 0 else 1.0
    return plan(step)


def remember_position(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Keep the epoch and step a loaded checkpoint was saved at (for :func:`validation_position`), and
    the epoch length of its run (for :func:`apply_scheduled_lr`)."""
    module._loaded_at = (int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0)))
    module._saved_steps_per_epoch = (checkpoint.get(CHECKPOINT_KEY) or {}).get("steps_per_epoch")


def _plain(value: Any) -> Any:
    # Checkpoints and configs hold lists where code may hold tuples; compare them as the same.
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


#: Preprocessing entries that describe evaluation only (the test views): a run may change them freely.
EVALUATION_SETTINGS = frozenset({"test_clips", "test_crops"})
#: The value of a preprocessing entry that a checkpoint written before the setting existed lacks.
SETTING_DEFAULTS: dict[str, Any] = {"crop_foreground": False, "target_fps": None}


def restore_preprocessing(module: pl.LightningModule, saved: dict[str, Any] | None,
                          applied: dict[str, Any] | None) -> None:
    """Set ``module.preprocessing`` on load from a checkpoint's ``saved`` settings.

    ``applied`` is what this run's data module does to its inputs (``None`` without a data module
    that says: ``load_from_checkpoint``, a data module of the user's own). Its settings are what the
    model sees in this run, so they win over the module's own (its configuration, or the
    hyperparameters LightningCLI read from the checkpoint) and the checkpoint's, and are what this
    run's checkpoints record, which inference follows. Where that differs from the checkpoint
    (resuming or testing with changed data settings) a warning names each setting that changed.
    """
    # The data module's settings whole: a setting it turned off must not survive from the checkpoint.
    merged = dict(applied) if applied else {**(saved or {}), **dict(getattr(module, "preprocessing", None) or {})}

    def value(settings: dict[str, Any] | None, key: str) -> Any:
        # A checkpoint from before a setting existed holds it off.
        return _plain((settings or {}).get(key, SETTING_DEFAULTS.get(key)))

    changed = sorted(k for k in set(saved or {}) | set(merged)
                     if k not in EVALUATION_SETTINGS and value(saved, k) != value(merged, k))
    if saved and changed:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {merged.get(k)!r}" for k in changed)
        rank_zero_warn(
            f"this run's data preprocessing differs from the checkpoint's ({shown}); this run's is what the model "
            "sees now and what its checkpoints record (oct3d infer/segment follow it). Pass the checkpoint's "
            "settings to the data module to keep the model's training conditions",
        )
    if merged:
        module.preprocessing = merged
        module.hparams["preprocessing"] = dict(merged)


_UNLABELLED_TEST = (
    "the test split has videos without labels (label -1: annotations without a label column, as Kinetics-700-2020's "
    "test set), so there is nothing to score; use lightning predict or oct3d infer for their predictions, or test "
    "on a labelled split"
)


def load_initial_weights(model: nn.Module, path: str | os.PathLike,
                         num_classes: int | None = None) -> tuple[list[str], list[str]]:
    """Copy the weights of a checkpoint into ``model`` where names and shapes match (fine-tuning).

    ``path`` is a checkpoint of ``lightning fit`` (its ``state_dict``, ``model.`` prefixes removed) or a
    saved state dict of the network itself (``module.``/``_orig_mod.`` prefixes of DDP and
    ``torch.compile`` removed), read with ``torch.load(weights_only=True)``. A weight whose shape
    differs (the classifier of another class count) keeps its new initialisation. Returns the
    loaded names and the re-initialised ones.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no state dict, or one of another network (weights missing or extra, or
            of other shapes than a classifier for another class count).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"init_weights {path}: no such file")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, a file that is not a checkpoint
        raise ValueError(f"init_weights {path}: not a checkpoint or state dict loadable with weights_only "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:160]})") from None
    # The project's unwrapping (Lightning's "state_dict", DDP's "module.", torch.compile's "_orig_mod."), then the
    # LightningModule's own attribute: the network is its "model".
    state = plain_state_dict(data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"init_weights {path}: holds no state dict of tensors")
    if isinstance(data, dict) and "state_dict" in data:
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")} or state
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise ValueError(
            f"init_weights {path} holds another network: {len(missing)} of this model's weights are not in it "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}) and {len(extra)} of its are not in "
            f"this model ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); build the backbone with the "
            "checkpoint's settings (backbone, backbone_kwargs)"
        )
    reinitialised = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    # Only the classifier may differ, in its output count (num_classes): other shapes mean another network.
    wrong = [k for k in reinitialised
             if num_classes is None or not own[k].dim() or own[k].shape[0] != num_classes
             or tuple(own[k].shape[1:]) != tuple(state[k].shape[1:])]
    if wrong:
        shown = ", ".join(f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in wrong[:3])
        raise ValueError(
            f"init_weights {path} holds another network: weights have other shapes ({shown}"
            f"{', ...' if len(wrong) > 3 else ''}) than a classifier for another class count; build the backbone "
            "with the checkpoint's settings (backbone, backbone_kwargs)"
        )
    loaded = [k for k in own if k not in reinitialised]
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return loaded, reinitialised


def apply_init_weights(module: pl.LightningModule, network: nn.Module) -> None:
    """Load ``module.hparams.init_weights`` into ``network`` once, at the start of a fit that restored
    nothing (a ``--ckpt_path`` resume brings its own weights; call it from ``on_fit_start``, which runs
    after the restore), and record it as done: ``init_weights`` becomes None in the hyperparameters
    and the source is kept as ``init_weights_from`` in the checkpoint's ``oct3d`` section, so the
    run's checkpoints reload (``load_from_checkpoint``, LightningCLI's ``--ckpt_path``) without the file."""
    path = module.hparams.get("init_weights")
    if not path or getattr(module, "_restored_from_checkpoint", False):
        return
    loaded, reinitialised = load_initial_weights(network, path, int(module.hparams.num_classes))
    detail = f"; kept the new initialisation of {', '.join(reinitialised)} (other shapes)" if reinitialised else ""
    rank_zero_info(f"init_weights: loaded {len(loaded)} weights from {path}{detail}")
    module.hparams["init_weights"] = None
    module.init_weights_from = str(path)


def check_data_classes(module: pl.LightningModule, names: list[str]) -> None:
    """Refuse a checkpoint whose class list (``names``) is not the one this run labels its data with.

    Label ``i`` of the data must be class ``i`` of the checkpoint: the same count in another order (a
    renamed or added class folder changes the sorted order) would score every sample against the wrong
    class. The run's names are the configured ones (``module.class_names``), else the data module's.
    """
    trainer = module._trainer
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    try:
        data_names = getattr(datamodule, "class_names", None)
    except (OSError, ValueError):  # no annotations to name classes (e.g. predicting on unlabelled files)
        data_names = None
    if getattr(module, "class_names", None) is not None:
        data_names = module.class_names
    if data_names is None or [str(n) for n in data_names] == [str(n) for n in names]:
        return
    differ = [i for i, (a, b) in enumerate(zip(names, data_names)) if str(a) != str(b)]
    shown = "; ".join(f"label {i}: checkpoint {names[i]!r}, data {data_names[i]!r}" for i in differ[:3])
    if len(names) != len(data_names):
        shown = f"{len(names)} classes in the checkpoint, {len(data_names)} in the data" + (
            f"; {shown}" if shown else "")
    raise ValueError(
        f"the checkpoint's classes differ from the data module's ({shown}): its predictions would be scored "
        "against the wrong labels; use the class list the model was trained with (the same class names in the "
        "same order), or fine-tune from its weights (--model.init_args.init_weights CKPT) instead of resuming "
        "with --ckpt_path"
    )


def validation_position(module: pl.LightningModule) -> tuple[int, int]:
    """The epoch and step a validation log line names: the loops' in ``fit``; in ``validate``/``test``,
    which do not restore the loops, the loaded checkpoint's."""
    loaded = getattr(module, "_loaded_at", None)
    if module.trainer.state.fn != "fit" and loaded is not None:
        return loaded
    return module.current_epoch, module.global_step


def apply_scheduled_lr(trainer: pl.Trainer, peak_lr: float | None = None,
                       saved_steps_per_epoch: int | None = None) -> None:
    """Set each optimizer's learning rates to what its ``LambdaLR`` schedule says for the current step.

    Called when training starts: a resumed run restores the optimizer's last learning rate, which
    belongs to the old plan (0 at the end of a cosine), and the scheduler would only correct it
    after the first step. ``peak_lr`` (the module's peak for this run: its ``lr``, scaled for this run's
    total batch) replaces the peak the checkpoint's scheduler restored, so a resumed run follows its own
    configuration (``--model.lr``, a different device count under the linear scaling rule); a change is
    logged. ``saved_steps_per_epoch`` (the epoch length of the run that saved the checkpoint): where this
    run's epochs have another number of steps (another batch size, device count or accumulation) and
    ``max_epochs`` bounds the run, the restored step count is rescaled to the same point of the run in
    epochs, so the curve continues where it was instead of running ahead (to 0) or behind.
    """
    per_epoch = steps_per_epoch(trainer)
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or scheduler.last_epoch <= 0:
            continue
        if saved_steps_per_epoch and per_epoch and saved_steps_per_epoch != per_epoch and \
                _run_steps(trainer, per_epoch)[1]:
            step = round(scheduler.last_epoch * per_epoch / saved_steps_per_epoch)
            rank_zero_info(f"resumed at step {step} of this run's learning-rate schedule ({per_epoch} steps per epoch; "
                           f"the checkpoint's run had {saved_steps_per_epoch}, and stopped at its step "
                           f"{scheduler.last_epoch})")
            scheduler.last_epoch = step
        if peak_lr is not None and any(not math.isclose(base, peak_lr) for base in scheduler.base_lrs):
            rank_zero_info(f"resumed with peak learning rate {peak_lr:g} (the checkpoint's schedule had "
                           f"{', '.join(f'{b:g}' for b in scheduler.base_lrs)})")
            scheduler.base_lrs = [float(peak_lr)] * len(scheduler.base_lrs)
            for group in scheduler.optimizer.param_groups:
                group["initial_lr"] = float(peak_lr)
        for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


class OctaveClassifier(pl.LightningModule):
    """Shared training logic of the video and image classifiers (see their docstrings for the arguments).

    Subclasses set :attr:`task` and :attr:`input_key` (the batch dict key of the input tensor).
    """

    task: str = ""
    input_key: str = ""
    #: The metric ``OctCLI`` keeps the best checkpoint by, unless the config names another.
    checkpoint_monitor: str = "val/top1"

    def __init__(
        self,
        backbone: str,
        backbone_kwargs: dict[str, Any] | None = None,
        num_classes: int = 400,
        class_names: list[str] | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        lr_reference_batch_size: int | None = None,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        no_weight_decay_on_norm_and_bias: bool = False,
        warmup_epochs: float = 0.0,
        warmup_start_factor: float = 0.01,
        min_lr_factor: float = 0.0,
        label_smoothing: float = 0.0,
        preprocessing: dict[str, Any] | None = None,
        init_weights: str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} entries but num_classes is {num_classes}; when resuming with "
                "--ckpt_path, class_names come from the checkpoint, which was then trained on another class list"
            )
        check_optimization(optimizer, lr, warmup_epochs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if lr_reference_batch_size is not None and lr_reference_batch_size < 1:
            raise ValueError(f"lr_reference_batch_size must be >= 1 or None, got {lr_reference_batch_size}")
        backbone_kwargs = dict(backbone_kwargs or {})
        if "num_classes" in backbone_kwargs:
            raise ValueError("pass num_classes as the module's num_classes, not inside backbone_kwargs")
        # Every builder argument, defaults included, so the checkpoint (and hparams.yaml) rebuilds this
        # network even if a default changes later; a misspelt key is a clear error here.
        backbone_kwargs = builder_arguments(backbone, backbone_kwargs, omit=("num_classes",))
        # Kept as plain types (str, int, float, list, dict) so the checkpoint loads with weights_only=True.
        self.save_hyperparameters()
        # A subclass's own arguments win in save_hyperparameters, so the complete dict is set here.
        record_hparam(self, "backbone_kwargs", backbone_kwargs)
        self.model: nn.Module = get_model(backbone, num_classes=num_classes, **backbone_kwargs)
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None
        self.preprocessing: dict[str, Any] = dict(preprocessing or {})
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        top5 = min(5, num_classes)
        # A metric object, not a per-step value, so that every rank logs the key even when all its
        # samples of an epoch were unreadable (a key missing on one rank hangs the epoch-end sync).
        self.val_loss = MeanMetric()
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self._test_views: dict[int, list] = {}

    # ----------------------------------------------------------------------------- forward / steps
    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of the backbone for an input batch."""
        return self.model(x)

    def _unpack(self, batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(inputs, labels or None, video_index or None) from a dict batch or an ``(x, y)`` tuple."""
        if isinstance(batch, dict):
            if self.input_key not in batch:
                raise KeyError(f"{type(self).__name__} expects batches with key {self.input_key!r}, got {list(batch)}")
            return batch[self.input_key], batch.get("label"), batch.get("video_index")
        if isinstance(batch, (tuple, list)):
            return batch[0], (batch[1] if len(batch) > 1 else None), None
        return batch, None, None

    def _log_failed(self, batch: Any, stage: str) -> None:
        # Unreadable files are replaced by the data module and reported once per epoch by its
        # DataErrorReport callback; a running count in the logs makes them visible on dashboards too.
        failed = batch.get("failed") if isinstance(batch, dict) else None
        count = 0
        if isinstance(failed, (list, tuple)):
            # Videos, not samples: a training item's clips (clips_per_video) share the video's index and
            # batch (a validation video is one view; test counts its failed videos as a set, see test_step).
            index = batch.get("video_index")
            if isinstance(index, Tensor) and index.numel() == len(failed):
                count = len({i for i, f in zip(index.tolist(), failed) if f})
            else:
                count = sum(1 for f in failed if f)
        # Logged on every step, zeros included: a synced key that only some ranks log hangs the epoch's end.
        self.log(f"{stage}/failed_videos", float(count), reduce_fx="sum", on_step=False, on_epoch=True,
                 sync_dist=True, batch_size=1)

    def on_train_start(self) -> None:
        """A resumed run starts at the learning rate its schedule gives the restored step."""
        apply_scheduled_lr(self.trainer, self.effective_lr(), getattr(self, "_saved_steps_per_epoch", None))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Cross-entropy (with label smoothing) on one training batch."""
        x, y, _ = self._unpack(batch)
        logits = self(x)
        loss = self.criterion(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log("train/top1", acc, prog_bar=False, on_step=False, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        self._log_failed(batch, "train")
        return loss

    def _readable(self, batch: Any, like: Tensor) -> Tensor | None:
        """Mask (on ``like``'s device) of the samples that are what they say (``None``: all of them). The
        data module replaces an unreadable video by another one (``batch["failed"]`` names it), which keeps
        a batch whole for training, but in evaluation the substitute would be scored in the failed video's
        place."""
        failed = batch.get("failed") if isinstance(batch, dict) else None
        if not isinstance(failed, (list, tuple)) or not any(failed):
            return None
        return torch.tensor([not f for f in failed], dtype=torch.bool, device=like.device)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Loss and per-sample (per-clip) top-1/top-5, over the samples that were readable."""
        x, y, _ = self._unpack(batch)
        keep = self._readable(batch, x)
        if keep is not None:
            x, y = x[keep], y[keep]
        self._log_failed(batch, "val")
        if x.shape[0]:
            logits = self(x)
            self.val_top1.update(logits, y)
            self.val_top5.update(logits, y)
            self.val_loss.update(F.cross_entropy(logits, y), weight=x.shape[0])
        self.log("val/loss", self.val_loss, batch_size=max(x.shape[0], 1))
        self.log("val/top1", self.val_top1, prog_bar=True, batch_size=max(x.shape[0], 1))
        self.log("val/top5", self.val_top5, batch_size=max(x.shape[0], 1))

    def on_validation_epoch_end(self) -> None:
        """One plain log line per validation epoch, readable without a progress bar (logs, CI, the demo)."""
        if self.trainer.sanity_checking:
            return
        # The logged metric objects are computed and reset only after this hook, so compute them here.
        shown = f"val/top1={float(self.val_top1.compute()):.4f} val/top5={float(self.val_top5.compute()):.4f}"
        train_loss = self.trainer.callback_metrics.get("train/loss")
        if train_loss is not None:
            shown += f" train/loss={float(train_loss):.4f}"
        epoch, step = validation_position(self)
        rank_zero_info(f"epoch {epoch} step {step}: {shown}")

    def on_test_epoch_start(self) -> None:
        """Reset the per-video softmax accumulators."""
        self._test_views = {}
        self._test_failed: set[int] = set()
        # view_index -> (video_index, top-1 hit, top-5 hit): the per-view metrics count each view once, even
        # when DDP's sampler hands a padded repeat of it to another rank.
        self._test_view_hits: dict[int, tuple[int, int, int]] = {}
        # view_index -> (video_index, softmax, label) of the views a padded sampler may repeat (see test_step).
        self._test_first_views: dict[int, tuple[int, Tensor, int]] = {}

    def on_test_start(self) -> None:
        """Refuse a test split without labels (every rank reads the same split, so every rank refuses)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        datasets = getattr(datamodule, "datasets", None)
        dataset = datasets.get("test") if isinstance(datasets, dict) else None
        samples = getattr(dataset, "samples", None)
        if samples and any(int(getattr(sample, "label", 0)) < 0 for sample in samples):
            raise ValueError(_UNLABELLED_TEST)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Per-view top-1/top-5; with ``video_index`` in the batch, also accumulates softmax per video.

        A video any of whose views was unreadable (replaced by the data module) is left out of the
        view and the video metrics alike, and counted in ``test/failed_videos``.
        """
        x, y, video_index = self._unpack(batch)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if (y is None or bool((y < 0).any())) and not distributed:
            # (Under DDP on_test_start has checked the data module's split on every rank alike; a raise on the
            # one rank that meets the label here would leave the others waiting in a collective.)
            raise ValueError(_UNLABELLED_TEST)
        keep = self._readable(batch, x)
        if video_index is None:
            self._log_failed(batch, "test")  # every step: a synced key (see _log_failed)
        if keep is not None:
            if video_index is not None:
                self._test_failed.update(video_index[~keep].tolist())
                video_index = video_index[keep]
            x, y = x[keep], y[keep]
        if video_index is None:
            # Logged on every step, updated or not: every rank must log each synced key.
            self.log("test/view_top1", self.test_top1, batch_size=max(x.shape[0], 1))
            self.log("test/view_top5", self.test_top5, batch_size=max(x.shape[0], 1))
        if not x.shape[0]:
            return
        logits = self(x)
        if video_index is None:
            self.test_top1.update(logits, y)
            self.test_top5.update(logits, y)
            return
        # Per video: the softmax sum, the view count, the label and the views right at top-1 / top-5, so
        # that the view metrics, like the video ones, leave out a video any of whose views was unreadable.
        probs = logits.float().softmax(1).detach().cpu()
        labels = y.cpu()
        k = min(5, probs.shape[1])
        top1 = (probs.argmax(1) == labels).tolist()
        top5 = (probs.topk(k, 1).indices == labels[:, None]).any(1).tolist()
        view_index = batch.get("view_index") if isinstance(batch, dict) else None
        if isinstance(view_index, Tensor) and keep is not None and view_index.numel() == keep.numel():
            view_index = view_index[keep]
        named = isinstance(view_index, Tensor) and view_index.numel() == len(top1)
        if named:
            for view, idx, hit1, hit5 in zip(view_index.tolist(), video_index.tolist(), top1, top5):
                self._test_view_hits[view] = (idx, int(hit1), int(hit5))
        # DDP's sampler pads the split with repeats of its first views (one fewer than the ranks at most),
        # which may land on any rank: those views are kept apart, by view, and added to their videos once.
        world = torch.distributed.get_world_size() if distributed else 1
        for i, idx in enumerate(video_index.tolist()):
            if named and int(view_index[i]) < world:
                self._test_first_views[int(view_index[i])] = (idx, probs[i].clone(), int(labels[i]))
                continue
            entry = self._test_views.get(idx)
            if entry is None:
                self._test_views[idx] = [probs[i].clone(), 1, int(labels[i]), int(top1[i]), int(top5[i])]
            else:
                entry[0] += probs[i]
                entry[1] += 1
                entry[3] += int(top1[i])
                entry[4] += int(top5[i])

    def on_test_epoch_end(self) -> None:
        """Average the softmax over all views of each video, then log video-level top-1/top-5."""
        failed = getattr(self, "_test_failed", set())
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            failed_parts: list[set] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
            torch.distributed.all_gather_object(failed_parts, failed)
            failed = set().union(*failed_parts)
        if failed:
            self.log("test/failed_videos", float(len(failed)), rank_zero_only=True, sync_dist=False)
        if not self._test_views and not distributed:
            return
        views = {idx: entry for idx, entry in self._test_views.items() if idx not in failed}
        if distributed:
            # Views of one video may land on different ranks; the index space is global, so merge by index.
            gathered: list[dict] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
            torch.distributed.all_gather_object(gathered, views)
            merged: dict[int, list] = defaultdict(lambda: [0.0, 0, -1, 0, 0])
            for part in gathered:
                for idx, (prob_sum, count, label, top1_hits, top5_hits) in part.items():
                    merged[idx][0] = merged[idx][0] + prob_sum
                    merged[idx][1] += count
                    merged[idx][2] = label
                    merged[idx][3] += top1_hits
                    merged[idx][4] += top5_hits
            views = dict(merged)
        first_views = getattr(self, "_test_first_views", {})
        if distributed:
            gathered_first: list[dict] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
            torch.distributed.all_gather_object(gathered_first, first_views)
            first_views = {view: entry for part in gathered_first for view, entry in part.items()}  # repeats: once
        for idx, prob, label in first_views.values():
            if idx in failed:
                continue
            entry = views.setdefault(idx, [torch.zeros_like(prob), 0, label, 0, 0])
            entry[0] = entry[0] + prob
            entry[1] += 1
            hit = prob.topk(min(5, prob.numel())).indices
            entry[3] += int(hit[0] == label)
            entry[4] += int(bool((hit == label).any()))
        view_hits = getattr(self, "_test_view_hits", {})
        if distributed:
            gathered_hits: list[dict] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
            torch.distributed.all_gather_object(gathered_hits, view_hits)
            view_hits = {view: hits for part in gathered_hits for view, hits in part.items()}  # repeats: once
        self._test_views, self._test_first_views = {}, {}
        if not views:
            return
        indices = sorted(views)
        probs = torch.stack([views[i][0] / views[i][1] for i in indices])
        labels = torch.tensor([views[i][2] for i in indices])
        k = min(5, probs.shape[1])
        topk = probs.topk(k, dim=1).indices
        top1 = (topk[:, 0] == labels).float().mean()
        top5 = (topk == labels[:, None]).any(1).float().mean()
        # Every rank holds the merged result, so no further reduction is needed (logged as plain floats:
        # Lightning asks for sync_dist on every epoch-level tensor under DDP).
        self.log("test/top1", float(top1), rank_zero_only=True, sync_dist=False)
        self.log("test/top5", float(top5), rank_zero_only=True, sync_dist=False)
        self.log("test/num_videos", float(len(indices)), rank_zero_only=True, sync_dist=False)
        counted = [(hit1, hit5) for idx, hit1, hit5 in view_hits.values() if idx in views]
        if counted:  # the batches named their views: each counted once
            total_views = len(counted)
            view_top1, view_top5 = sum(h[0] for h in counted), sum(h[1] for h in counted)
        else:
            total_views = sum(views[i][1] for i in indices)
            view_top1, view_top5 = sum(views[i][3] for i in indices), sum(views[i][4] for i in indices)
        self.log("test/view_top1", view_top1 / total_views, rank_zero_only=True, sync_dist=False)
        self.log("test/view_top5", view_top5 / total_views, rank_zero_only=True, sync_dist=False)
        self._test_views = {}

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Softmax probabilities (and ``video_index`` / ``label`` when the batch has them).

        A video that could not be read was replaced by another one in the batch; its row of
        ``probs`` is NaN and ``failed`` (a bool per sample, present when the batch says which
        failed) is True, so no other video's scores are filed under its index.
        """
        x, y, video_index = self._unpack(batch)
        probs = self(x).float().softmax(1)
        out = {"probs": probs}
        keep = self._readable(batch, probs)
        if isinstance(batch, dict) and isinstance(batch.get("failed"), (list, tuple)):
            out["failed"] = torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device) if keep is None \
                else ~keep
        if keep is not None:
            probs[~keep] = float("nan")
        if video_index is not None:
            out["video_index"] = video_index
        if y is not None:
            out["label"] = y if keep is None else torch.where(keep, y, torch.full_like(y, -1))
        return out

    # ----------------------------------------------------------------------------- metadata
    def on_fit_start(self) -> None:
        """Load ``init_weights`` when this fit restored no checkpoint (see :func:`apply_init_weights`)."""
        apply_init_weights(self, self.model)

    def setup(self, stage: str) -> None:
        """Take class names and preprocessing from the data module when they were not given."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        if self.class_names is None:
            names = getattr(datamodule, "class_names", None)
            if names is not None and len(names) == self.hparams.num_classes:
                self.class_names = [str(n) for n in names]
                self.hparams["class_names"] = list(self.class_names)
        if not self.preprocessing:
            self.preprocessing = self._preprocessing_from(datamodule)
            self.hparams["preprocessing"] = dict(self.preprocessing)

    default_mean: list[float] = _IMAGENET_MEAN
    default_std: list[float] = _IMAGENET_STD

    #: Data module attributes that :meth:`_preprocessing_from` reads; a data module without them (one of the
    #: user's own) does not describe its preprocessing, and its defaults are never taken for what it does.
    preprocessing_attributes: tuple[str, ...] = ("mean", "std")

    def _applied_preprocessing(self, datamodule: Any) -> dict[str, Any] | None:
        """What ``datamodule`` does to its inputs, or ``None`` when it does not say (no data module, or one
        without :attr:`preprocessing_attributes`, whose defaults would be made up)."""
        if datamodule is None or not all(hasattr(datamodule, a) for a in self.preprocessing_attributes):
            return None
        return self._preprocessing_from(datamodule)

    def _preprocessing_from(self, datamodule: Any) -> dict[str, Any]:
        """What inference must do to a raw input to match the data module's evaluation transform."""
        mean = getattr(datamodule, "mean", None)
        std = getattr(datamodule, "std", None)
        return {
            "mean": [float(v) for v in (mean if mean is not None else self.default_mean)],
            "std": [float(v) for v in (std if std is not None else self.default_std)],
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store backbone, class names and preprocessing as plain types under ``checkpoint["oct3d"]``."""
        checkpoint[CHECKPOINT_KEY] = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "task": self.task,
            "module": type(self).__name__,
            "backbone": self.hparams.backbone,
            "backbone_kwargs": dict(self.hparams.backbone_kwargs or {}),
            "num_classes": int(self.hparams.num_classes),
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "preprocessing": dict(self.preprocessing),
            "init_weights_from": getattr(self, "init_weights_from", None),
            "steps_per_epoch": steps_per_epoch(self.trainer) if self._trainer is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore class names and preprocessing saved by :meth:`on_save_checkpoint`."""
        meta = checkpoint.get(CHECKPOINT_KEY) or {}
        remember_position(self, checkpoint)
        self._restored_from_checkpoint = True
        self.init_weights_from = meta.get("init_weights_from")
        self._check_same_network(checkpoint, meta)
        if meta.get("class_names") is not None:
            check_data_classes(self, list(meta["class_names"]))
            self.class_names = list(meta["class_names"])
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        restore_preprocessing(self, meta.get("preprocessing"), self._applied_preprocessing(datamodule))

    def _check_same_network(self, checkpoint: dict[str, Any], meta: dict[str, Any]) -> None:
        # Resuming (or testing) with a config that builds another network would fail in load_state_dict with a
        # list of missing keys; name the builder settings that differ instead.
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict) or self._trainer is None or not getattr(self, "strict_loading", True):
            # Only a Trainer's restore (resume, validate/test --ckpt_path) loads strictly by strict_loading;
            # load_from_checkpoint(strict=False) and strict_loading=False ask for partial loads.
            return
        own = self.state_dict()
        differ = sorted(set(own) ^ set(state)) + sorted(
            k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)
        )
        if not differ:
            return
        # Only what the checkpoint recorded can be compared (a checkpoint without oct3d's metadata names nothing).
        saved = dict(meta.get("backbone_kwargs") or {})
        if "backbone" in meta:
            saved["backbone"] = meta["backbone"]
        current = {"backbone": self.hparams.backbone, **dict(self.hparams.backbone_kwargs or {})}
        keys = sorted(set(saved) | ((set(current) - {"backbone"}) if "backbone_kwargs" in meta else set()))
        changed = [f"{k}: checkpoint {saved.get(k, 'unset')!r}, config {current.get(k, 'unset')!r}"
                   for k in keys if saved.get(k, "unset") != current.get(k, "unset")]
        if meta.get("num_classes") is not None and int(meta["num_classes"]) != int(self.hparams.num_classes):
            changed.append(f"num_classes: checkpoint {meta['num_classes']}, config {self.hparams.num_classes}")
        raise ValueError(
            "the checkpoint holds another network than this config builds ("
            + ("; ".join(changed) if changed else f"{len(differ)} parameter(s) differ, e.g. {differ[0]}")
            + "): give the model the checkpoint's settings to resume or test it, or start a new run from its "
            "weights (oct3d.models.load_vanilla, or load_state_dict with strict=False)"
        )

    # ----------------------------------------------------------------------------- optimisation
    def effective_lr(self) -> float:
        """``lr``, scaled linearly by total batch / ``lr_reference_batch_size`` when that is set.

        The batch counts samples per optimizer step: a data module drawing several clips per video
        (``clips_per_video``) reports them through ``clips_per_batch``, which is used over ``batch_size``.
        """
        lr = float(self.hparams.lr)
        reference = self.hparams.lr_reference_batch_size
        if reference is None or self._trainer is None:
            return lr
        datamodule = getattr(self.trainer, "datamodule", None)
        per_device = getattr(datamodule, "clips_per_batch", None) or getattr(datamodule, "batch_size", None)
        if per_device is None:
            raise ValueError("lr_reference_batch_size is set but the data module has no batch_size attribute")
        total = int(per_device) * self.trainer.world_size * self.trainer.accumulate_grad_batches
        return lr * total / reference

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD/AdamW plus a per-step linear-warmup + cosine schedule over the whole run."""
        hp = self.hparams
        if hp.no_weight_decay_on_norm_and_bias:
            decay, no_decay = [], []
            for p in self.parameters():
                if p.requires_grad:
                    (no_decay if p.ndim <= 1 else decay).append(p)
            groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        else:
            groups = [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": hp.weight_decay}]
        lr = self.effective_lr()
        fast = foreach_kwargs([p for group in groups for p in group["params"]])
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum, nesterov=hp.nesterov,
                                                         **fast)
        else:
            opt = torch.optim.AdamW(groups, lr=lr, **fast)
        schedule = warmup_cosine_schedule(opt, self.trainer, hp.warmup_epochs, hp.warmup_start_factor, hp.min_lr_factor)
        return {"optimizer": opt, "lr_scheduler": schedule}


class VideoClassifier(OctaveClassifier):
    """Video classification with an octave video backbone (``oct_i3d_r50``, ``oct_c2d_r50``, ``oct_r3d_18``...).

    Batches are dicts ``{"video": (B, 3, T, H, W), "label": (B,), "video_index": (B,), ...}`` or
    ``(video, label)`` tuples. Validation reports per-clip top-1/top-5 (``val/top1``, ``val/top5``);
    test additionally averages the softmax over all views of each video (``video_index``) and reports
    video-level ``test/top1``/``test/top5`` (the 10 clips x 3 crops protocol when the data module
    yields 30 views per video).

    Args:
        backbone: registered model name (``oct3d.models.list_models("video")``).
        backbone_kwargs: extra builder arguments, e.g. ``{"alpha": 0.5, "octave": "spatial", "dropout": 0.5}``.
        num_classes: number of classes; the CLI links it from ``data.num_classes``.
        class_names: class names in label order; taken from the data module at fit start when omitted.
        optimizer: ``"sgd"`` (with ``momentum``, ``nesterov``) or ``"adamw"``.
        lr: peak learning rate (after warm-up); see ``lr_reference_batch_size``.
        lr_reference_batch_size: when set, the peak LR is ``lr * total_batch / lr_reference_batch_size``
            (linear scaling rule) with total_batch = per-device batch x devices x nodes x accumulation.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        weight_decay: weight decay (L2 for SGD, decoupled for AdamW).
        no_weight_decay_on_norm_and_bias: exempt BatchNorm parameters and biases from weight decay.
        warmup_epochs: linear warm-up length in epochs (fractions allowed); then cosine decay to the end.
        warmup_start_factor: LR multiplier at the first step of the warm-up.
        min_lr_factor: LR multiplier reached at the end of the cosine.
        label_smoothing: label smoothing of the training cross-entropy.
        preprocessing: inference preprocessing (``num_frames``, ``sampling_rate``, ``crop_size``,
            ``short_side``, ``mean``, ``std``, and ``target_fps`` when the data module sets one); taken from
            the data module at fit start when omitted.
        init_weights: fine-tune from this checkpoint (of ``lightning fit``, or a state dict of the same
            backbone): its weights are loaded at the start of a fit that does not resume, and a layer of
            another shape (the classifier, for another class count) keeps its new initialisation.
    """

    task = "video"
    input_key = "video"
    default_mean = _KINETICS_MEAN
    default_std = _KINETICS_STD

    def __init__(
        self,
        backbone: str = "oct_i3d_r50",
        backbone_kwargs: dict[str, Any] | None = None,
        num_classes: int = 400,
        class_names: list[str] | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        lr_reference_batch_size: int | None = None,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        no_weight_decay_on_norm_and_bias: bool = False,
        warmup_epochs: float = 0.0,
        warmup_start_factor: float = 0.01,
        min_lr_factor: float = 0.0,
        label_smoothing: float = 0.0,
        preprocessing: dict[str, Any] | None = None,
        init_weights: str | None = None,
    ) -> None:
        super().__init__(
            backbone, backbone_kwargs, num_classes, class_names, optimizer, lr, lr_reference_batch_size, momentum,
            nesterov, weight_decay, no_weight_decay_on_norm_and_bias, warmup_epochs, warmup_start_factor,
            min_lr_factor, label_smoothing, preprocessing, init_weights,
        )

    preprocessing_attributes = ("num_frames", "sampling_rate", "crop_size")

    def _preprocessing_from(self, datamodule: Any) -> dict[str, Any]:
        out = super()._preprocessing_from(datamodule)
        crop = int(getattr(datamodule, "crop_size", 224))
        out.update(
            num_frames=int(getattr(datamodule, "num_frames", 8)),
            sampling_rate=int(getattr(datamodule, "sampling_rate", 8)),
            crop_size=crop,
            # Evaluation resizes the short side to this before cropping.
            short_side=int(getattr(datamodule, "eval_short_side", None) or getattr(datamodule, "min_short_side", None)
                           or crop),
        )
        target_fps = getattr(datamodule, "target_fps", None)
        # With a rate, sampling_rate counts frames at it (datamodules.video.source_step); None: source frames.
        out["target_fps"] = float(target_fps) if target_fps is not None else None
        # The test protocol, so that `oct3d infer --test-views` scores a video as `lightning test` did.
        for key in ("test_clips", "test_crops"):
            value = getattr(datamodule, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] = value
        return out


class ImageClassifier(OctaveClassifier):
    """Image classification with an octave 2D backbone (``oct_resnet50``, ``oct_mobilenet_v2``...).

    Batches are dicts ``{"image": (B, 3, H, W), "label": (B,)}`` or ``(image, label)`` tuples.
    Same arguments as :class:`VideoClassifier` (``backbone`` defaults to ``"oct_resnet50"``,
    ``num_classes`` to 1000); ``preprocessing`` holds ``crop_size``, ``resize_size``, ``mean``, ``std``.
    """

    task = "image"
    input_key = "image"

    def __init__(
        self,
        backbone: str = "oct_resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        num_classes: int = 1000,
        class_names: list[str] | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        lr_reference_batch_size: int | None = None,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        no_weight_decay_on_norm_and_bias: bool = False,
        warmup_epochs: float = 0.0,
        warmup_start_factor: float = 0.01,
        min_lr_factor: float = 0.0,
        label_smoothing: float = 0.0,
        preprocessing: dict[str, Any] | None = None,
        init_weights: str | None = None,
    ) -> None:
        super().__init__(
            backbone, backbone_kwargs, num_classes, class_names, optimizer, lr, lr_reference_batch_size, momentum,
            nesterov, weight_decay, no_weight_decay_on_norm_and_bias, warmup_epochs, warmup_start_factor,
            min_lr_factor, label_smoothing, preprocessing, init_weights,
        )

    preprocessing_attributes = ("crop_size",)

    def _preprocessing_from(self, datamodule: Any) -> dict[str, Any]:
        out = super()._preprocessing_from(datamodule)
        crop = int(getattr(datamodule, "crop_size", 224))
        out.update(crop_size=crop, resize_size=int(getattr(datamodule, "resize_size", round(crop * 256 / 224))))
        return out
