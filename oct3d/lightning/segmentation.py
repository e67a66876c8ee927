"""Lightning module for volumetric segmentation: :class:`VolumeSegmenter`.

It trains any 3D segmentation network (``oct_unet3d`` by registry name, or an ``nn.Module`` such
as ``monai.networks.nets.UNet`` given by ``class_path``) with MONAI's Dice + cross-entropy loss
on patches, validates with sliding-window inference over whole volumes and reports per-class
Dice, and writes everything inference needs (backbone, class names, patch size, normalisation,
spacing) into the checkpoint as plain types, so ``torch.load(weights_only=True)`` reads it and
``oct3d segment`` needs no config. With ``octavize``, a vanilla backbone (a MONAI network, say) is
converted into an octave network by :func:`oct3d.octavize` before training; the conversion's
settings go into the checkpoint too, so inference rebuilds exactly the trained network.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric

from oct3d.lightning.modules import (
    CHECKPOINT_FORMAT_VERSION,
    CHECKPOINT_KEY,
    apply_init_weights,
    apply_scheduled_lr,
    check_data_classes,
    check_optimization,
    foreach_kwargs,
    record_hparam,
    remember_position,
    restore_preprocessing,
    steps_per_epoch,
    validation_position,
    warmup_cosine_schedule,
)
from oct3d.models import builder_arguments, get_model
from oct3d.nn.conv import check_positive_int

__all__ = ["OCTAVIZE_KEYS", "VolumeSegmenter", "build_backbone", "class_path_of", "is_octave_network",
           "registry_kwargs", "resolve_octavize"]

#: The keyword arguments of :func:`oct3d.octavize` that ``VolumeSegmenter(octavize={...})`` takes
#: (plain types, so they go into checkpoints), plus ``example_size``: the spatial size ``(X, Y, Z)`` of
#: the example input the conversion traces with (default: the training patch size).
OCTAVIZE_KEYS = ("alpha", "octave", "exclude", "pool_first", "vanilla_coarsest", "validate", "example_size")


def class_path_of(module: nn.Module) -> str:
    """``"package.module.ClassName"`` of a module's class (what a config's ``class_path`` names)."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def registry_kwargs(name: str, backbone_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Every builder argument of registry model ``name`` (``backbone_kwargs`` over its defaults), less
    ``in_channels`` and ``num_classes``, which the module passes itself.

    Raises:
        ValueError: ``in_channels`` or ``num_classes`` inside ``backbone_kwargs``, or a key the builder
            does not take (the error names the builder's arguments).
    """
    kwargs = dict(backbone_kwargs or {})
    for key in ("in_channels", "num_classes"):
        if key in kwargs:
            raise ValueError(f"pass {key} as the module's {key}, not inside backbone_kwargs")
    return builder_arguments(name, kwargs, omit=("in_channels", "num_classes"))


def build_backbone(spec: str | dict[str, Any], in_channels: int, num_classes: int,
                   backbone_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build a segmentation network from a registry name or a ``{"class_path", "init_args"}`` dict.

    A registry name (``"oct_unet3d"``) is built with ``in_channels``, ``num_classes`` and
    ``backbone_kwargs``; a class path is imported and called with its ``init_args`` alone (they
    carry the network's own channel arguments, e.g. MONAI's ``in_channels``/``out_channels``).

    Raises:
        ValueError: an unknown name, an unimportable class path, or a spec without ``init_args``.
    """
    if isinstance(spec, str):
        kwargs = registry_kwargs(spec, backbone_kwargs)
        return get_model(spec, in_channels=in_channels, num_classes=num_classes, **kwargs)
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ValueError(f"backbone must be a registry name, an nn.Module or {{'class_path', 'init_args'}}, "
                         f"got {spec!r}")
    stray = sorted(set(spec) - {"class_path", "init_args"})
    if stray:
        # e.g. `--model.init_args.backbone.init_args.channels [..]` on the command line: the CLI puts the
        # value beside init_args instead of into it, and it would otherwise be dropped without a word.
        raise ValueError(
            f"backbone {spec['class_path']} has key(s) {stray} beside class_path/init_args; put them into "
            "init_args (on the command line, give the whole backbone: --model.init_args.backbone "
            "'{\"class_path\": ..., \"init_args\": {...}}')"
        )
    if spec.get("init_args") is None:
        raise ValueError(
            f"backbone {spec['class_path']} was given as a module object, so its constructor arguments are unknown; "
            "train through the CLI (class_path/init_args in the config) or pass backbone as "
            "{'class_path': ..., 'init_args': {...}} to make checkpoints rebuildable"
        )
    module_name, _, class_name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"backbone class_path {spec['class_path']!r} cannot be imported ({error})") from error
    init_args = dict(spec["init_args"])
    check_backbone_channels(init_args, in_channels, num_classes)
    return cls(**init_args)


#: Names networks give their channel arguments (MONAI, timm-style, segmentation_models_pytorch, plain U-Nets).
BACKBONE_CHANNEL_ARGS = {
    "in_channels": ("in_channels", "in_chans", "n_channels", "input_channels"),
    "num_classes": ("out_channels", "num_classes", "n_classes", "classes", "out_chans"),
}


def check_backbone_channels(init_args: dict[str, Any], in_channels: int, num_classes: int) -> None:
    """Refuse a class-path backbone whose own channel arguments disagree with the module's.

    Otherwise a network with one class too many trains a phantom class for a whole epoch and then
    fails in validation with an index error (or, without validation, writes labels nobody named).

    Raises:
        ValueError: naming the ``init_args`` key, its value and the value the data needs.
    """
    for setting, expected in (("in_channels", in_channels), ("num_classes", num_classes)):
        for key in BACKBONE_CHANNEL_ARGS[setting]:
            value = init_args.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value != expected:
                what = "image channels" if setting == "in_channels" else "classes (background included)"
                raise ValueError(
                    f"the backbone's init_args.{key} is {value} but the model has {setting}={expected} "
                    f"({what}; with the data module, dataset.json's); set "
                    f"model.init_args.backbone.init_args.{key}: {expected} in the config (on the command line, "
                    "give the whole backbone: --model.init_args.backbone '{\"class_path\": ..., \"init_args\": "
                    f"{{..., \"{key}\": {expected}}}}}')"
                )


def resolve_octavize(spec: float | dict[str, Any] | None) -> dict[str, Any] | None:
    """The complete ``octavize`` settings of a ratio or a dict of :data:`OCTAVIZE_KEYS`; None stays None.

    Every key gets its value (``octavize``'s defaults where not given), so a checkpoint that records
    the result rebuilds the same network even if those defaults change later.

    Raises:
        ValueError: a ratio outside [0, 1), an unknown key, or a value of the wrong type.
    """
    if spec is None:
        return None
    if not isinstance(spec, dict):
        spec = {"alpha": spec}
    unknown = sorted(set(spec) - set(OCTAVIZE_KEYS))
    if unknown:
        raise ValueError(f"octavize got unknown key(s) {unknown}; expected a ratio or a dict of {list(OCTAVIZE_KEYS)}")
    from oct3d.nn.octave import OCTAVE_MODES

    out: dict[str, Any] = {"alpha": 0.5, "octave": "spatial", "exclude": [], "pool_first": None,
                           "vanilla_coarsest": True, "validate": True, "example_size": None, **spec}
    alpha = out["alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"octavize alpha (the ratio of low-frequency channels) must be a number in [0, 1), "
                         f"got {alpha!r}")
    out["alpha"] = float(alpha)
    if out["octave"] not in OCTAVE_MODES:
        raise ValueError(f"octavize octave must be one of {OCTAVE_MODES}, got {out['octave']!r}")
    exclude = [out["exclude"]] if isinstance(out["exclude"], str) else out["exclude"]
    if not isinstance(exclude, (list, tuple)) or not all(isinstance(e, str) for e in exclude):
        raise ValueError(f"octavize exclude must be a list of module names, got {out['exclude']!r}")
    out["exclude"] = list(exclude)
    if out["pool_first"] is not None and not isinstance(out["pool_first"], bool):
        raise ValueError(f"octavize pool_first must be null, true or false, got {out['pool_first']!r}")
    for key in ("vanilla_coarsest", "validate"):
        if not isinstance(out[key], bool):
            raise ValueError(f"octavize {key} must be true or false, got {out[key]!r}")
    size = out["example_size"]
    if size is not None:
        if (not isinstance(size, (list, tuple)) or len(size) != 3
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise ValueError(f"octavize example_size must be 3 positive ints (X, Y, Z), got {size!r}")
        out["example_size"] = [int(s) for s in size]
    return out


def resample_to_grid(volume: Tensor, source_affine: Tensor, target_affine: Tensor, size: Sequence[int]) -> Tensor:
    """``volume`` ``(1, C, X, Y, Z)`` on the grid of ``source_affine``, resampled trilinearly onto the grid of
    ``target_affine`` with ``size`` voxels (both affines voxel-to-world 4x4); outside the source, the border value."""
    # Each target voxel's index in the source grid: inv(source) @ target, applied to the target indices.
    to_source = torch.linalg.inv(source_affine.double()) @ target_affine.double()
    axes = [torch.arange(n, dtype=torch.float64) for n in size]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # (X, Y, Z, 3)
    source_index = index @ to_source[:3, :3].T + to_source[:3, 3]
    extent = torch.tensor([max(n - 1, 1) for n in volume.shape[2:]], dtype=torch.float64)
    # grid_sample's grid holds (W, H, D) = (Z, Y, X) coordinates in [-1, 1] (align_corners=True: the centres).
    grid = (2 * source_index / extent - 1).flip(-1)[None].to(volume.dtype).to(volume.device)
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)


def to_original_grid(probs: Tensor, source_affine: Tensor, original_affine: Tensor, size: Sequence[int],
                     crop_box: Tensor | None = None) -> Tensor:
    """Class probabilities ``(1, C, ...)`` on the preprocessed grid (``source_affine``), put onto the file's
    own grid (``original_affine``, ``size`` voxels).

    ``crop_box`` (``(2, 3)``: start and end voxel of a foreground crop in the file's grid) limits the
    resampling to the box; outside it every voxel is background (probability 1 for class 0).
    """
    if crop_box is None:
        return resample_to_grid(probs, source_affine, original_affine, size)
    start, end = (crop_box[0].tolist(), crop_box[1].tolist())
    box_affine = original_affine.double().clone()
    box_affine[:3, 3] = original_affine.double()[:3, :3] @ torch.tensor(start, dtype=torch.float64) \
        + original_affine.double()[:3, 3]
    inside = resample_to_grid(probs, source_affine, box_affine, [e - s for s, e in zip(start, end)])
    out = torch.zeros((*probs.shape[:2], *size), dtype=probs.dtype, device=probs.device)
    out[:, 0] = 1.0
    out[(slice(None), slice(None), *(slice(s, e) for s, e in zip(start, end)))] = inside
    return out


def is_octave_network(module: nn.Module) -> bool:
    """Whether ``module`` already has octave layers (oct3d's builders, or a network ``octavize`` returned)."""
    from oct3d.nn import OctBatchNorm, OctConv
    from oct3d.nn.transposed import OctConvTranspose

    meta = getattr(module, "meta", None)
    if getattr(module, "octave_plan", None) is not None or (isinstance(meta, dict) and "octave_plan" in meta):
        return True
    return any(isinstance(m, (OctConv, OctConvTranspose, OctBatchNorm)) for m in module.modules())


def _metric_name(class_name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]+", "_", class_name.strip()).strip("_").lower() or "class"


class VolumeSegmenter(pl.LightningModule):
    """Volumetric segmentation with a 3D network, trained on patches and validated on whole volumes.

    Batches are dicts from :class:`datamodules.VolumeSegmentationDataModule`: ``image``
    ``(B, C, X, Y, Z)``, ``label`` ``(B, 1, X, Y, Z)`` (label values), ``valid`` and ``failed``.
    Training minimises ``lambda_dice * Dice + lambda_ce * CE`` (``monai.losses.DiceCELoss``).
    Validation (and test, when test cases have labels) runs ``sliding_window_inference`` over each
    whole volume with Gaussian blending and logs the Dice of every foreground class
    (``val/dice_<class name>``) and their mean (``val/dice``).

    Args:
        backbone: a registry name (``"oct_unet3d"``), a ``{"class_path", "init_args"}`` dict, or an
            ``nn.Module`` (in a config: ``class_path: monai.networks.nets.UNet`` with ``init_args``).
            It maps ``(B, in_channels, D, H, W)`` to logits ``(B, num_classes, D, H, W)``.
        backbone_kwargs: builder arguments for a registry name, e.g. ``{"alpha": 0.5, "base_width": 16}``.
        in_channels: image channels (``dataset.json``'s modalities; checked against the data module).
        num_classes: label values including background; the CLI links it from ``data.num_classes``.
        class_names: names in label order; taken from the data module at fit start when omitted.
        depth_axis: which array axis (0, 1, 2 of ``(X, Y, Z)``) the network sees as its depth D. With
            ``octave="spatial"`` the low branch halves H and W but keeps D, so give the through-plane
            (slice) axis of anisotropic scans, usually 2; None keeps ``(X, Y, Z)`` as ``(D, H, W)``.
        optimizer: ``"adamw"`` or ``"sgd"`` (with ``momentum``, Nesterov).
        lr: peak learning rate (after warm-up), then cosine decay to ``min_lr_factor * lr``.
        weight_decay: weight decay.
        momentum: SGD momentum.
        warmup_epochs: linear warm-up length in epochs.
        min_lr_factor: LR multiplier at the end of the cosine.
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        sw_batch_size: sliding-window patches per forward pass in validation.
        overlap: overlap of neighbouring sliding windows (0.5 in nnU-Net and MONAI tutorials).
        preprocessing: ``patch_size``, ``normalization``, ``nonzero``, ``window``, ``spacing``; taken
            from the data module at fit start when omitted.
        octavize: convert a vanilla backbone into an octave network with :func:`oct3d.octavize` before
            training: a ratio of low-frequency channels (``0.5``) or a dict of :data:`OCTAVIZE_KEYS`
            (``{"alpha": 0.5, "octave": "spatial"}``). The example input is
            ``randn(1, in_channels, *patch_size)`` (seeded; axes ordered by ``depth_axis``), so without
            ``preprocessing`` or ``example_size`` the conversion happens at fit start, when the data
            module gives the patch size. The complete settings are recorded in the checkpoint.
        init_weights: fine-tune from this checkpoint (of ``lightning fit``, or a state dict of the same
            network; with ``octavize``, of the converted one): loaded at the start of a fit that does not
            resume, and a layer of another shape (the head, for another class count) keeps its new
            initialisation.
    """

    #: The metric ``OctCLI`` keeps the best checkpoint by, unless the config names another.
    checkpoint_monitor: str = "val/dice"

    task = "segmentation"

    def __init__(
        self,
        backbone: str | dict[str, Any] | nn.Module = "oct_unet3d",
        backbone_kwargs: dict[str, Any] | None = None,
        in_channels: int = 1,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        depth_axis: int | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        momentum: float = 0.99,
        warmup_epochs: float = 0.0,
        min_lr_factor: float = 0.0,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        sw_batch_size: int = 2,
        overlap: float = 0.5,
        preprocessing: dict[str, Any] | None = None,
        octavize: float | dict[str, Any] | None = None,
        init_weights: str | None = None,
    ) -> None:
        super().__init__()
        octave_settings = resolve_octavize(octavize)
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_classes, "num_classes")
        check_positive_int(sw_batch_size, "sw_batch_size")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background and at least one class), got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} entries but num_classes is {num_classes}; when resuming with "
                "--ckpt_path, class_names come from the checkpoint, which was then trained on another class list"
            )
        if depth_axis not in (None, 0, 1, 2):
            raise ValueError(f"depth_axis must be 0, 1, 2 or None, got {depth_axis!r}")
        check_optimization(optimizer, lr, warmup_epochs)
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if lambda_dice < 0 or lambda_ce < 0 or lambda_dice + lambda_ce == 0:
            raise ValueError(f"lambda_dice and lambda_ce must be >= 0 and not both 0, got {lambda_dice}, {lambda_ce}")
        from monai.losses import DiceCELoss

        # Under the CLI, hparams["backbone"] is the config's {"class_path", "init_args"} dict; a module
        # object passed in Python is replaced by its class path, so the checkpoint stays plain types.
        # (The CLI gives a class path as that dict, so only a module passed in Python is ignored here.)
        if isinstance(backbone, dict) and backbone_kwargs:
            raise ValueError("backbone_kwargs apply to registry names; put a class path's arguments in init_args")
        if isinstance(backbone, str):
            # Every builder argument, defaults included, so the checkpoint (and hparams.yaml) rebuilds this
            # network even if a default changes later; a misspelt key is a clear error here.
            backbone_kwargs = registry_kwargs(backbone, backbone_kwargs)
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if isinstance(backbone, str):
            record_hparam(self, "backbone_kwargs", backbone_kwargs)  # a subclass's own arguments win above
        self.model = backbone if isinstance(backbone, nn.Module) else build_backbone(
            backbone, in_channels, num_classes, backbone_kwargs
        )
        spec = self.hparams.get("backbone", backbone)
        if isinstance(spec, nn.Module):
            spec = {"class_path": class_path_of(spec), "init_args": None}
        elif isinstance(spec, dict):
            spec = {"class_path": spec.get("class_path", spec.get("_class_path")),
                    "init_args": spec.get("init_args", {k: v for k, v in spec.items() if k != "_class_path"})}
        self.hparams["backbone"] = spec
        self._octavize = octave_settings
        self._octavized = False
        self._failures_seen: dict[str, set[str]] = {}
        if octave_settings is not None and is_octave_network(self.model):
            raise ValueError(
                f"octavize converts a vanilla network, but the backbone {class_path_of(self.model)} already has "
                "octave layers; set its own ratio instead (backbone_kwargs.alpha for oct_unet3d) or drop octavize"
            )
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None
        from datamodules.volume import check_preprocessing  # deferred: importing datamodules loads the video decoders

        self.preprocessing: dict[str, Any] = dict(check_preprocessing(dict(preprocessing or {})))
        self.criterion = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        # One running mean per foreground class and stage; NaN (class absent from a case) is skipped.
        self.val_dice = nn.ModuleList(MeanMetric(nan_strategy="ignore") for _ in range(num_classes - 1))
        self.test_dice = nn.ModuleList(MeanMetric(nan_strategy="ignore") for _ in range(num_classes - 1))
        if octave_settings is not None and (octave_settings["example_size"] or self.preprocessing.get("patch_size")):
            self._convert_backbone()

    def _convert_backbone(self) -> None:
        """Replace the vanilla backbone by ``oct3d.octavize`` of it, and record the settings used."""
        from oct3d.convert import ConversionError, octavize

        settings = dict(self._octavize)
        size = settings["example_size"] or self.patch_size
        axis = self.hparams.depth_axis or 0
        # The network sees (D, H, W) = the depth axis first (see forward), so the example does too.
        spatial = [size[axis]] + [size[a] for a in range(3) if a != axis]
        reference = next(self.model.parameters(), None)
        # Random, not zeros: a network's output on zeros can be spatially constant (SegResNet's is),
        # and then octavize's validation of the converted network would compare almost nothing.
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(1, self.hparams.in_channels, *spatial, generator=generator).to(
            reference.device if reference is not None else None
        )
        try:
            self.model = octavize(
                self.model, settings["alpha"], example_input=example, octave=settings["octave"],
                exclude=tuple(settings["exclude"]), pool_first=settings["pool_first"],
                vanilla_coarsest=settings["vanilla_coarsest"], validate=settings["validate"],
            )
        except ConversionError as error:
            raise ValueError(f"octavize cannot convert the backbone {class_path_of(self.model)} "
                             f"on an example of shape {tuple(example.shape)}: {error}") from error
        settings["example_size"] = [int(s) for s in size]
        self._octavize = settings
        self._octavized = True
        self.hparams["octavize"] = dict(settings)

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes, X, Y, Z)`` of a volume batch ``(B, in_channels, X, Y, Z)``."""
        if not isinstance(x, Tensor) or x.dim() != 5 or x.shape[1] != self.hparams.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects (B, {self.hparams.in_channels}, X, Y, Z), got {shape}")
        if self._octavize is not None and not self._octavized:
            raise RuntimeError("the backbone is not octavized yet: octavize needs the patch size, so fit with the "
                               "data module, or pass preprocessing={'patch_size': [...]} or octavize example_size")
        axis = self.hparams.depth_axis
        if axis is None or axis == 0:
            return self.model(x)
        order = [0, 1, 2 + axis] + [2 + a for a in range(3) if a != axis]
        inverse = [order.index(i) for i in range(5)]
        out = self.model(x.permute(order))
        if out.dim() == 6:  # deep supervision (B, heads, C, ...): the head axis stays in place
            return out.permute([0, 1] + [i + 1 for i in inverse[1:]])
        return out.permute(inverse)

    @property
    def patch_size(self) -> list[int]:
        """The training patch, also the sliding window of validation and inference."""
        patch = self.preprocessing.get("patch_size")
        if not patch:
            raise ValueError("no patch_size: pass preprocessing={'patch_size': [...]} or train with the data module")
        return [int(s) for s in patch]

    def sliding_window(self, image: Tensor, overlap: float | None = None, sw_batch_size: int | None = None) -> Tensor:
        """Logits of a whole volume ``(B, C, X, Y, Z)`` by Gaussian-blended sliding windows of ``patch_size``
        (``sw_batch_size`` windows per forward pass; default the module's)."""
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(
            image, self.patch_size, sw_batch_size or self.hparams.sw_batch_size, self,
            overlap=self.hparams.overlap if overlap is None else overlap, mode="gaussian",
        )

    # ----------------------------------------------------------------------------- steps
    def _log_failed(self, batch: Any, stage: str) -> None:
        # Bad volumes are replaced or skipped by the data module and reported once per epoch by its
        # DataErrorReport callback; a running count in the logs makes them visible on dashboards too.
        failed = batch.get("failed") if isinstance(batch, dict) else None
        # Volumes, not patches: every training patch of a bad case carries the same failure, and the
        # patches of one case spread over the epoch's batches, so a failure counts once per epoch.
        seen = self._failures_seen.setdefault(stage, set())  # emptied when the stage's epoch starts
        new = {f for f in failed if f} - seen if isinstance(failed, (list, tuple)) else set()
        seen |= new
        count = len(new)
        # Logged on every step, zeros included: a synced key that only some ranks log hangs the epoch's end.
        self.log(f"{stage}/failed_volumes", float(count), reduce_fx="sum", on_step=False, on_epoch=True,
                 sync_dist=True, batch_size=1)

    def on_train_start(self) -> None:
        """A resumed run starts at the learning rate its schedule gives the restored step."""
        apply_scheduled_lr(self.trainer, float(self.hparams.lr), getattr(self, "_saved_steps_per_epoch", None))

    def on_train_epoch_start(self) -> None:
        """Count this epoch's bad volumes afresh."""
        self._failures_seen.pop("train", None)

    def on_validation_epoch_start(self) -> None:
        """Count this validation run's bad volumes afresh."""
        self._failures_seen.pop("val", None)

    def on_test_epoch_start(self) -> None:
        """Count this test run's bad volumes afresh."""
        self._failures_seen.pop("test", None)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Dice + cross-entropy on a batch of patches (over every head of a deep-supervision output)."""
        image, label = batch["image"], batch["label"]
        logits = self(image)
        # The loss runs in float32 whatever the autocast precision: softmax and Dice sums are precision-sensitive.
        if logits.dim() == 6:
            # Deep supervision (MONAI's DynUNet in training mode: (B, heads, C, X, Y, Z), every head at full size):
            # the heads weighted 1, 1/2, 1/4, ... and normalised, as nnU-Net weights them.
            weights = torch.tensor([0.5**i for i in range(logits.shape[1])])
            weights = weights / weights.sum()
            loss = sum(w * self.criterion(head.float(), label.long()) for w, head in zip(weights.tolist(),
                                                                                           logits.unbind(1)))
        else:
            loss = self.criterion(logits.float(), label.long())
        self.log("train/loss", loss, prog_bar=True, batch_size=image.shape[0])
        self._log_failed(batch, "train")
        return loss

    def _evaluate(self, batch: dict[str, Any], metrics: nn.ModuleList, stage: str) -> None:
        self._log_failed(batch, stage)
        valid = batch.get("valid")
        keep = [i for i in range(batch["image"].shape[0]) if valid is None or bool(valid[i])]
        label = batch["label"]
        if not keep or label.numel() == 0:
            return
        from monai.metrics import compute_dice

        image, label = batch["image"][keep], label[keep].long()
        logits = self.sliding_window(image)
        if "affine_resampled" in batch:
            # Reoriented, resampled or cropped: back onto the label's own grid, probabilities first (as
            # `oct3d segment` does), so the Dice is the one of the label maps users get.
            boxes = batch.get("crop_box")
            probs = torch.cat([
                to_original_grid(logits[i : i + 1].float().softmax(1), batch["affine_resampled"][j],
                                 batch["affine_original"][j], label.shape[2:],
                                 None if boxes is None else boxes[j])
                for i, j in enumerate(keep)
            ])
            prediction = probs.argmax(1, keepdim=True)
        else:
            prediction = logits.argmax(1, keepdim=True)
        num_classes = self.hparams.num_classes
        one_hot = lambda t: torch.zeros((t.shape[0], num_classes, *t.shape[2:]), device=t.device).scatter_(1, t, 1.0)
        predicted = one_hot(prediction)
        # Per case and foreground class. A class absent from the ground truth scores 0 where it was
        # predicted anyway (a false positive, as nnU-Net and BraTS count it) and NaN, left out of the
        # class's mean, where it was rightly not predicted.
        dice = compute_dice(predicted, one_hot(label), include_background=False)
        false_positive = dice.isnan() & predicted[:, 1:].flatten(2).any(2)
        dice = dice.masked_fill(false_positive, 0.0)
        for c, metric in enumerate(metrics):
            metric.update(dice[:, c])

    def _log_dice(self, metrics: nn.ModuleList, stage: str) -> dict[str, float]:
        names = self.class_names or [str(i) for i in range(self.hparams.num_classes)]
        values = {}
        updated = torch.tensor([metric.update_called for metric in metrics], dtype=torch.int32, device=self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # compute() is a collective: every rank must call it for a class updated on any rank (a rank
            # whose volumes were all unreadable holds the metric's empty state, which reduces as nothing).
            torch.distributed.all_reduce(updated, op=torch.distributed.ReduceOp.MAX)
        for c, metric in enumerate(metrics):
            if not updated[c]:
                continue
            # MeanMetric.compute() already reduces across ranks.
            values[f"{stage}/dice_{_metric_name(names[c + 1])}"] = metric.compute()
            metric.reset()
        if values:
            finite = [v for v in values.values() if torch.isfinite(v)]
            mean = torch.stack(finite).mean() if finite else torch.tensor(float("nan"))
            values = {f"{stage}/dice": mean, **values}
        elif stage == "val":
            # Every validation volume of the epoch was unreadable (reported by the data module): the
            # checkpoint callback still finds its metric, as NaN, which it ranks below every real Dice
            # (EarlyStopping's check_finite=True would stop on it).
            values = {"val/dice": torch.tensor(float("nan"))}
        for key, value in values.items():
            # Already reduced over ranks (MeanMetric.compute); a plain float spares DDP's sync_dist warning.
            self.log(key, float(value), prog_bar=key == f"{stage}/dice", sync_dist=False)
        return {k: float(v) for k, v in values.items()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Sliding-window logits of each whole volume, accumulated into per-class Dice."""
        self._evaluate(batch, self.val_dice, "val")

    def on_validation_epoch_end(self) -> None:
        """Log ``val/dice`` and ``val/dice_<class>``, and one plain line (readable without a progress bar)."""
        values = self._log_dice(self.val_dice, "val")
        if values and not self.trainer.sanity_checking:
            shown = " ".join(f"{k}={v:.4f}" for k, v in values.items())
            train_loss = self.trainer.callback_metrics.get("train/loss")
            if train_loss is not None:
                shown += f" train/loss={float(train_loss):.4f}"
            epoch, step = validation_position(self)
            rank_zero_info(f"epoch {epoch} step {step}: {shown}")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Per-class Dice on test volumes that have labels (dataset.json test entries with a ``label``)."""
        self._evaluate(batch, self.test_dice, "test")

    def on_test_epoch_end(self) -> None:
        """Log ``test/dice`` and ``test/dice_<class>``; warn when no test volume had a label to score."""
        if not self._log_dice(self.test_dice, "test"):
            rank_zero_warn(
                "no test volume had a readable label, so there is no test Dice (dataset.json's test entries are "
                "image paths; give them as {'image': ..., 'label': ...} to score them). To write label maps of "
                "unlabelled volumes, run `oct3d segment --checkpoint CKPT --output-dir DIR VOLUMES`"
            )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Label maps ``(B, 1, X, Y, Z)`` (uint8) of whole volumes."""
        return self.sliding_window(batch["image"]).argmax(1, keepdim=True).to(torch.uint8)

    # ----------------------------------------------------------------------------- metadata
    def setup(self, stage: str) -> None:
        """Take class names and preprocessing from the data module when not given; then run ``octavize`` if asked.

        Raises:
            ValueError: channels differ from the data's, or octavize has no patch size or cannot convert.
        """
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self._take_data_settings(datamodule)
        # Before configure_optimizers and before a --ckpt_path restore, so both see the octave network.
        if self._octavize is not None and not self._octavized:
            self._convert_backbone()

    def on_fit_start(self) -> None:
        """Load ``init_weights`` into the network this module trains (the converted one with ``octavize``)
        when this fit restored no checkpoint (see :func:`~oct3d.lightning.modules.apply_init_weights`)."""
        apply_init_weights(self, self.model)

    def _take_data_settings(self, datamodule: Any) -> None:
        # Checks in_channels against dataset.json's modalities, then fills what the module was not given.
        channels = getattr(datamodule, "in_channels", None)
        if channels is not None and int(channels) != self.hparams.in_channels:
            raise ValueError(
                f"the data has {channels} image channel(s) (dataset.json modalities) but the model was built with "
                f"in_channels={self.hparams.in_channels}; set model.init_args.in_channels: {channels}"
            )
        names = getattr(datamodule, "class_names", None)
        if names is not None and len(names) != self.hparams.num_classes:
            raise ValueError(
                f"the data has {len(names)} classes (dataset.json labels, background included: {list(names)}) but "
                f"the model was built with num_classes={self.hparams.num_classes}; set model.init_args.num_classes: "
                f"{len(names)}"
            )
        if self.class_names is None and names is not None:
            self.class_names = [str(n) for n in names]
            self.hparams["class_names"] = list(self.class_names)
        if not self.preprocessing and getattr(datamodule, "preprocessing", None):
            self.preprocessing = dict(datamodule.preprocessing)
            self.hparams["preprocessing"] = dict(self.preprocessing)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store backbone, class names and preprocessing as plain types under ``checkpoint["oct3d"]``."""
        spec = self.hparams["backbone"]
        checkpoint[CHECKPOINT_KEY] = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "task": self.task,
            "module": type(self).__name__,
            "backbone": spec if isinstance(spec, str) else {"class_path": spec["class_path"],
                                                            "init_args": spec.get("init_args")},
            "backbone_kwargs": dict(self.hparams.backbone_kwargs or {}),
            "in_channels": int(self.hparams.in_channels),
            "num_classes": int(self.hparams.num_classes),
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "depth_axis": self.hparams.depth_axis,
            "overlap": float(self.hparams.overlap),
            "preprocessing": dict(self.preprocessing),
            "octavize": dict(self._octavize) if self._octavized else None,
            "init_weights_from": getattr(self, "init_weights_from", None),
            "steps_per_epoch": steps_per_epoch(self.trainer) if self._trainer is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore class names and preprocessing saved by :meth:`on_save_checkpoint`."""
        meta = checkpoint.get(CHECKPOINT_KEY) or {}
        remember_position(self, checkpoint)
        self._restored_from_checkpoint = True
        self.init_weights_from = meta.get("init_weights_from")
        if (
            int(meta.get("format_version", CHECKPOINT_FORMAT_VERSION)) < 2 and meta.get("backbone") == "oct_unet3d"
            and "base_width" not in (meta.get("backbone_kwargs") or {})
            and self.hparams.get("backbone") == "oct_unet3d"  # a module or class path: its own width, not checked
            and (self.hparams.get("backbone_kwargs") or {}).get("base_width") != 16
        ):
            raise ValueError(
                "this checkpoint (format 1) was trained with oct_unet3d's old default base_width 16; build the "
                "module with backbone_kwargs.base_width: 16 (tools/segment.py does this by itself)"
            )
        saved, current = meta.get("octavize"), self._octavize if self._octavized else None
        if "octavize" in meta and saved != current:
            raise ValueError(f"the checkpoint's backbone was converted with octavize={saved}, this module with "
                             f"octavize={current}; build the module with the checkpoint's settings")
        if meta.get("class_names") is not None:
            check_data_classes(self, list(meta["class_names"]))
            self.class_names = list(meta["class_names"])
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        applied = getattr(datamodule, "preprocessing", None) if datamodule is not None else None
        restore_preprocessing(self, meta.get("preprocessing"), dict(applied) if isinstance(applied, dict) else None)

    # ----------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW or SGD plus a per-step linear-warmup + cosine schedule over the whole run."""
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        fast = foreach_kwargs(params)
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, nesterov=True,
                                                         weight_decay=hp.weight_decay, **fast)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, **fast)
        schedule = warmup_cosine_schedule(opt, self.trainer, hp.warmup_epochs, 0.01, hp.min_lr_factor)
        return {"optimizer": opt, "lr_scheduler": schedule}
