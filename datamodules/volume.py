"""Volumetric segmentation data in the Medical Segmentation Decathlon layout: reading, checks, a LightningDataModule.

The layout (every Decathlon task, and most public datasets converted for nnU-Net/MONAI)::

    root/dataset.json    {"name", "modality": {"0": "FLAIR", ...}, "labels": {"0": "background", ...},
                          "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}, ...],
                          "test": ["./imagesTs/b.nii.gz", ...]}
    root/imagesTr/  root/labelsTr/  root/imagesTs/

Images are NIfTI (``.nii``, ``.nii.gz``) read with nibabel; a 4D image is a multi-channel volume whose
last axis holds the modalities (BraTS: FLAIR, T1w, T1gd, T2w), turned channel-first. Arrays keep
nibabel's axis order, so a volume is ``(C, X, Y, Z)`` as in MONAI. Test entries may also be
``{"image", "label"}`` dicts (an extension: then ``lightning test`` reports Dice).

Preprocessing (cached in memory when ``cache_rate`` > 0) and augmentation are MONAI transforms.
Unreadable volumes, image/label shape mismatches and label values outside ``dataset.json``'s
classes never stop a run: the case is skipped (validation, test) or replaced by another case
(training), and ``"path: reason"`` travels in the batch's ``failed`` list, so that
:class:`datamodules.DataErrorReport` reports it once per epoch, as for videos.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .base import SplitDataModule
from .reporting import replacement_indices

__all__ = [
    "NIFTI_SUFFIXES",
    "DecathlonCase",
    "DecathlonInfo",
    "VolumeDataset",
    "VolumeReadError",
    "VolumeSegmentationDataModule",
    "load_nifti",
    "preprocess_transform",
    "read_decathlon",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NORMALIZATIONS = ("zscore", "window", "none")
MODES = ("train", "val", "test")
# The label of an unlabelled or skipped case: empty, so batches of whole volumes still collate.
_EMPTY_LABEL = torch.zeros((1, 0, 0, 0), dtype=torch.uint8)


class VolumeReadError(Exception):
    """A volume that cannot be used: unreadable, wrong shape, or labels outside the dataset's classes."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class DecathlonCase:
    """One case: an image file and, for training cases, its label map.

    Attributes:
        image: path of the image NIfTI (may not exist: that is reported when it is read).
        label: path of the label NIfTI, or None (unlabelled test case).
    """

    image: str
    label: str | None = None

    @property
    def name(self) -> str:
        """The image file name without ``.nii``/``.nii.gz``."""
        base = os.path.basename(self.image)
        for suffix in (".nii.gz", ".nii"):
            if base.endswith(suffix):
                return base[: -len(suffix)]
        return base


@dataclass(frozen=True)
class DecathlonInfo:
    """The parsed ``dataset.json``.

    Attributes:
        name: the task name (``"BrainTumour"``), or the folder name.
        class_names: label names in label-value order (``labels`` of dataset.json; value 0 first).
        modalities: channel names in channel order (``modality`` of dataset.json).
        training: the labelled cases.
        test: the test cases (labelled when dataset.json gives ``{"image", "label"}`` entries).
    """

    name: str
    class_names: list[str]
    modalities: list[str]
    training: list[DecathlonCase]
    test: list[DecathlonCase]


def _resolve(root: Path, entry: str) -> str:
    return entry if os.path.isabs(entry) else str((root / entry).resolve())


def _sorted_by_key(mapping: dict, field: str, json_path: Path) -> list[str]:
    try:
        keys = sorted(int(k) for k in mapping)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{json_path}: '{field}' keys must be integers, got {list(mapping)}") from error
    if keys != list(range(len(keys))):
        raise ValueError(f"{json_path}: '{field}' keys must be 0..{len(keys) - 1} without gaps, got {keys}")
    return [str(mapping[str(k)] if str(k) in mapping else mapping[k]) for k in keys]


def read_decathlon(root: str | os.PathLike) -> DecathlonInfo:
    """Parse ``root/dataset.json`` (paths resolved against ``root``).

    Raises:
        FileNotFoundError: no ``root/dataset.json``.
        ValueError: missing or malformed ``labels``, ``modality`` or ``training`` entries.
    """
    root = Path(root)
    json_path = root / "dataset.json"
    if not json_path.is_file():
        raise FileNotFoundError(
            f"{json_path} not found: expected the Medical Segmentation Decathlon layout (root/dataset.json with "
            "'training', 'test', 'labels' and 'modality', and the folders imagesTr/, labelsTr/, imagesTs/)"
        )
    with open(json_path, encoding="utf-8-sig") as handle:
        meta = json.load(handle)
    for field in ("labels", "modality", "training"):
        if field not in meta:
            raise ValueError(f"{json_path}: missing the '{field}' entry")
    if not isinstance(meta["labels"], dict) or len(meta["labels"]) < 2:
        raise ValueError(f"{json_path}: 'labels' must map at least 2 label values to names, got {meta['labels']!r}")
    if not isinstance(meta["modality"], dict) or not meta["modality"]:
        raise ValueError(f"{json_path}: 'modality' must map channel numbers to names, got {meta['modality']!r}")
    training = []
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise ValueError(f"{json_path}: training entry {i} must be {{'image': ..., 'label': ...}}, got {entry!r}")
        training.append(DecathlonCase(_resolve(root, entry["image"]), _resolve(root, entry["label"])))
    test = []
    for i, entry in enumerate(meta.get("test") or []):
        if isinstance(entry, str):
            test.append(DecathlonCase(_resolve(root, entry)))
        elif isinstance(entry, dict) and "image" in entry:
            label = entry.get("label")
            test.append(DecathlonCase(_resolve(root, entry["image"]), _resolve(root, label) if label else None))
        else:
            raise ValueError(f"{json_path}: test entry {i} must be a path or {{'image': ...}}, got {entry!r}")
    return DecathlonInfo(
        name=str(meta.get("name") or root.name),
        class_names=_sorted_by_key(meta["labels"], "labels", json_path),
        modalities=_sorted_by_key(meta["modality"], "modality", json_path),
        training=training,
        test=test,
    )


def load_nifti(path: str | os.PathLike, channels: int | None = None,
               what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI image as a float32 channel-first array ``(C, X, Y, Z)`` and its 4x4 affine.

    A 3D file is one channel; a 4D file's last axis holds the channels (the Decathlon convention), and
    so does the fifth axis of a 5D vector image ``(X, Y, Z, 1, C)``.
    ``what="label"`` words the channel-count error for a label map (one channel of class values).

    Raises:
        VolumeReadError: missing, unreadable or truncated file, not 3D/4D, or not ``channels`` channels.
    """
    import nibabel as nib

    path = str(path)
    if not os.path.isfile(path):
        raise VolumeReadError(path, "a folder, not a file" if os.path.isdir(path) else "file not found")
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises many types for damaged files (EOFError, zlib, HeaderDataError...)
        first_line = (str(error).splitlines() or [""])[0][:120]
        raise VolumeReadError(path, f"unreadable ({type(error).__name__}: {first_line})") from None
    if data.ndim == 5 and data.shape[3] == 1:
        # A NIfTI vector image (X, Y, Z, 1, C): the components on the fifth axis, a time axis of one.
        data = data[:, :, :, 0, :]
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.ascontiguousarray(np.moveaxis(data, -1, 0))
    else:
        raise VolumeReadError(path, f"expected a 3D or 4D volume (or a 5D vector image (X, Y, Z, 1, C)), got shape "
                                    f"{data.shape}")
    if channels is not None and data.shape[0] != channels and what == "label":
        raise VolumeReadError(path, f"is a label map with {data.shape[0]} components; expected one channel of "
                                    "class values (0 = background)")
    if channels is not None and data.shape[0] != channels:
        raise VolumeReadError(path, f"has {data.shape[0]} channel(s), expected {channels}: one per modality of "
                                    "the dataset (dataset.json) or of the checkpoint's training data")
    if not np.isfinite(data).all():
        raise VolumeReadError(path, "holds NaN or infinite values")
    return data, np.asarray(image.affine, dtype=np.float64)


def _records_geometry(path: str) -> bool:
    """Whether a NIfTI header sets its sform or qform (codes 0 mean no recorded orientation or origin)."""
    import nibabel as nib

    header = nib.load(str(path)).header
    try:
        return bool(header["sform_code"]) or bool(header["qform_code"])
    except (KeyError, ValueError):  # not a NIfTI header (e.g. Analyze): no geometry of its own
        return False


def _load_case(case: DecathlonCase, channels: int, num_classes: int) -> dict[str, Any]:
    """Image (and label) arrays of one case, checked; raises :class:`VolumeReadError` naming the bad file."""
    image, affine = load_nifti(case.image, channels)
    out: dict[str, Any] = {"image": image, "affine": affine}
    if case.label is not None:
        label, label_affine = load_nifti(case.label, 1, what="label")
        if label.shape[1:] != image.shape[1:]:
            raise VolumeReadError(
                case.label, f"label shape {label.shape[1:]} differs from image shape {image.shape[1:]}"
            )
        # The label is used in the image's grid; one placed elsewhere in space (another origin, spacing or
        # orientation: a label of another scan, or a resampled copy) would train on misaligned voxels.
        # The tolerance absorbs float32 header rounding. A label whose header records no geometry at all
        # (masks written from arrays) has only nibabel's default affine: nothing to compare.
        if not np.allclose(label_affine, affine, rtol=1e-5, atol=1e-3) and _records_geometry(case.label):
            worst = float(np.abs(label_affine - affine).max())
            raise VolumeReadError(
                case.label, f"label geometry (affine) differs from its image's (largest entry difference {worst:.3g}): "
                            "the label must be in the image's voxel grid"
            )
        values = np.unique(label)
        fractional = values[values != np.round(values)]
        if fractional.size:
            # Seven digits (float32's): ":g" would print 1.000001 as "1", which reads like a valid class.
            shown = ", ".join(f"{v:.7g}" for v in fractional[:5])
            raise VolumeReadError(
                case.label, f"non-integer label values {shown}: a label map holds whole class numbers "
                            f"0..{num_classes - 1} (a resampled or smoothed label? resample labels with nearest "
                            "neighbour)"
            )
        bad = values[(values < 0) | (values >= num_classes)]
        if bad.size:
            shown = ", ".join(f"{v:g}" for v in bad[:5])
            raise VolumeReadError(
                case.label, f"label values {shown} outside dataset.json's classes 0..{num_classes - 1}"
            )
        out["label"] = label.astype(np.uint8)
    return out


#: The keys of a ``preprocessing`` dict (what a checkpoint stores and ``oct3d segment`` applies).
PREPROCESSING_KEYS = ("patch_size", "normalization", "nonzero", "window", "spacing", "modalities", "orientation",
                      "crop_foreground")


def _numbers(value: Any, count: int) -> bool:
    """Whether ``value`` is a list or tuple of ``count`` real numbers (bools excluded)."""
    return isinstance(value, (list, tuple)) and len(value) == count and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )


_ORIENTATION_RULE = "three axis codes such as 'RAS' (one of L/R, A/P, S/I each) or None"


def is_orientation(value: object) -> bool:
    """Whether ``value`` names a voxel orientation: three axis codes, one of L/R, A/P and S/I each (``"RAS"``)."""
    if not isinstance(value, str) or len(value) != 3:
        return False
    return sorted(next((pair for pair in ("LR", "AP", "IS") if c in pair), "?") for c in value.upper()) == [
        "AP", "IS", "LR"]


def check_preprocessing(preprocessing: dict[str, Any]) -> dict[str, Any]:
    """Return ``preprocessing`` if every entry is valid (see :func:`preprocess_transform`), else raise a
    ``ValueError`` naming the entry and what it must be."""
    if not isinstance(preprocessing, dict):
        raise ValueError(f"preprocessing must be a dict with keys from {PREPROCESSING_KEYS}, got {preprocessing!r}")
    unknown = sorted(set(preprocessing) - set(PREPROCESSING_KEYS))
    if unknown:
        raise ValueError(f"preprocessing has unknown keys {unknown}; known: {PREPROCESSING_KEYS}")

    patch = preprocessing.get("patch_size")
    if patch is not None and not (_numbers(patch, 3) and all(isinstance(v, int) and v >= 1
                                                                                 for v in patch)):
        raise ValueError(f"preprocessing['patch_size'] must be 3 positive ints (X, Y, Z), got {patch!r}")
    mode = preprocessing.get("normalization", "zscore")
    if mode not in NORMALIZATIONS:
        raise ValueError(f"preprocessing['normalization'] must be one of {NORMALIZATIONS}, got {mode!r}")
    if not isinstance(preprocessing.get("nonzero", True), bool):
        raise ValueError(f"preprocessing['nonzero'] must be a bool, got {preprocessing['nonzero']!r}")
    window = preprocessing.get("window")
    if (mode == "window" or window is not None) and not (
        _numbers(window, 2) and window[0] < window[1]
    ):
        raise ValueError(f"preprocessing['window'] must be [low, high] with low < high, got {window!r}")
    spacing = preprocessing.get("spacing")
    if spacing is not None and not (_numbers(spacing, 3) and all(v > 0 for v in spacing)):
        raise ValueError(f"preprocessing['spacing'] must be 3 positive voxel sizes in mm or None, got {spacing!r}")
    orientation = preprocessing.get("orientation")
    if orientation is not None and not is_orientation(orientation):
        raise ValueError(f"preprocessing['orientation'] must be {_ORIENTATION_RULE}, got {orientation!r}")
    if not isinstance(preprocessing.get("crop_foreground", False), bool):
        raise ValueError(f"preprocessing['crop_foreground'] must be a bool, got {preprocessing['crop_foreground']!r}")
    modalities = preprocessing.get("modalities")
    if modalities is not None and not (isinstance(modalities, (list, tuple)) and all(isinstance(m, str)
                                                                                     for m in modalities)):
        raise ValueError(f"preprocessing['modalities'] must be a list of names, got {modalities!r}")
    return preprocessing


#: Where a foreground crop's box starts and ends in the file's voxels (items with ``crop_foreground``).
CROP_KEYS = ("crop_start", "crop_end")


def is_nonzero(x: Any) -> Any:
    """The voxels ``crop_foreground`` keeps the bounding box of: nonzero in any channel (a skull-stripped
    MRI's zero background is cut away; a CT, whose air is -1000 HU, keeps its whole field of view).
    An all-zero image keeps its whole grid rather than becoming an empty volume."""
    mask = x != 0
    return mask if mask.any() else mask == mask


def preprocess_transform(preprocessing: dict[str, Any], with_label: bool) -> Any:
    """The deterministic MONAI transform (resampling, intensity normalisation) of ``preprocessing``.

    ``preprocessing`` holds ``normalization`` (``"zscore"``, ``"window"`` or ``"none"``), ``nonzero``
    (z-score over nonzero voxels only), ``window`` (``[low, high]`` mapped to [0, 1] and clipped) and
    ``spacing`` (voxel size in mm to resample to, or None to keep the file's), ``orientation`` (axis
    codes such as ``"RAS"`` to reorient every volume to first, or None to keep the file's) and
    ``crop_foreground`` (first crop to the bounding box of the nonzero voxels). It is what the data
    module applies to every volume and what ``oct3d segment`` applies to new ones, read from the checkpoint.
    """
    from monai.transforms import (
        Compose,
        CropForegroundd,
        NormalizeIntensityd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    keys = ["image", "label"] if with_label else ["image"]
    steps: list = []
    if preprocessing.get("crop_foreground"):
        # First, on the file's own voxel grid: the box of nonzero voxels (nnU-Net's crop to nonzero), whose
        # corners the item keeps (CROP_KEYS) so that evaluation and `oct3d segment` put the result back.
        steps.append(CropForegroundd(keys, source_key="image", select_fn=is_nonzero, allow_smaller=True,
                                     start_coord_key=CROP_KEYS[0], end_coord_key=CROP_KEYS[1]))
    orientation = preprocessing.get("orientation")
    if orientation:
        # Every array in one axis order and direction (a dataset mixing RAS and LAS files would otherwise
        # train on mirrored anatomy); undone by the inverse with the resampling.
        steps.append(Orientationd(keys, axcodes=str(orientation).upper(), labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    spacing = preprocessing.get("spacing")
    if spacing:
        modes = ("bilinear", "nearest") if with_label else ("bilinear",)
        steps.append(Spacingd(keys, pixdim=[float(s) for s in spacing], mode=modes))
    mode = preprocessing.get("normalization", "zscore")
    if mode == "zscore":
        steps.append(NormalizeIntensityd("image", nonzero=bool(preprocessing.get("nonzero", True)), channel_wise=True))
    elif mode == "window":
        low, high = (float(v) for v in preprocessing["window"])
        steps.append(ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    elif mode != "none":
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")
    return Compose(steps)


#: The two grids an evaluation item carries when the image was reoriented or resampled.
_GRID_KEYS = ("affine_original", "affine_resampled", "crop_box")
#: What an evaluation item carries besides the image.
_EVALUATION_KEYS = ("label", *_GRID_KEYS)


def _meta_tensors(item: dict[str, Any]) -> dict[str, Any]:
    from monai.data import MetaTensor

    affine = torch.as_tensor(item["affine"])
    out = {"image": MetaTensor(torch.from_numpy(item["image"]), affine=affine)}
    if "label" in item:
        out["label"] = MetaTensor(torch.from_numpy(item["label"]), affine=affine.clone())
    return out


class VolumeDataset(Dataset):
    """Map-style dataset of segmentation cases, robust to bad volumes.

    Modes:
        * ``"train"``: ``samples_per_volume`` items per case, each a random patch (``patch_size``,
          foreground-centred with probability ``fg_ratio``) after the random transform;
        * ``"val"`` / ``"test"``: one item per case, the whole preprocessed volume.

    Items are dicts: ``image`` float ``(C, X, Y, Z)``, ``label`` uint8 ``(1, X, Y, Z)`` (an empty
    ``(1, 0, 0, 0)`` placeholder for unlabelled test cases), ``valid`` bool,
    ``case`` (the case name) and ``failed`` (``""`` or ``"path: reason"``). With a target ``spacing``,
    a validation or test item's label stays on the file's own grid and the item also holds
    ``affine_original`` and ``affine_resampled`` (4x4 float64 voxel-to-world matrices of the label's and
    the image's grids), so predictions are scored where the label was drawn. A bad training case is
    replaced by another case; a bad validation or test case gives an item with ``valid`` False and
    empty tensors, which the model skips.

    Args:
        cases: the split's cases.
        mode: ``"train"``, ``"val"`` or ``"test"``.
        channels: image channels every case must have.
        num_classes: label values must lie in ``[0, num_classes)``.
        preprocessing: see :func:`preprocess_transform`.
        patch_size: training patch ``(X, Y, Z)``.
        random_transform: MONAI transform applied to each training patch (None: no augmentation).
        samples_per_volume: training items per case per epoch.
        fg_ratio: probability that a training patch is centred on a foreground (label > 0) voxel.
        cache_rate: fraction of the cases loaded and preprocessed once, at construction, and kept in memory.
        cache_workers: threads loading the cache.
        seed: varies the deterministic choice of replacement cases.
    """

    def __init__(
        self,
        cases: Sequence[DecathlonCase],
        mode: str,
        channels: int,
        num_classes: int,
        preprocessing: dict[str, Any],
        patch_size: Sequence[int] = (96, 96, 96),
        random_transform: Any = None,
        samples_per_volume: int = 1,
        fg_ratio: float = 0.5,
        cache_rate: float = 1.0,
        cache_workers: int = 2,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not cases:
            raise ValueError(f"the {mode} split has no case")
        if not 0.0 <= cache_rate <= 1.0:
            raise ValueError(f"cache_rate must be in [0, 1], got {cache_rate}")
        self.cases = list(cases)
        self.mode = mode
        self.channels = channels
        self.num_classes = num_classes
        self.patch_size = [int(s) for s in patch_size]
        self.samples_per_volume = samples_per_volume if mode == "train" else 1
        self.seed = seed
        labelled = all(c.label is not None for c in self.cases)
        if mode == "train" and not labelled:
            raise ValueError("training cases need labels")
        self.labelled = labelled
        # Evaluation of reoriented or resampled volumes scores on each file's own grid, as `oct3d segment`
        # writes its maps and nnU-Net reports: the image is transformed, the label kept, and both affines go
        # with the item.
        self._original_grid = mode != "train" and bool(
            preprocessing.get("spacing") or preprocessing.get("orientation") or preprocessing.get("crop_foreground"))
        self._prepare = preprocess_transform(preprocessing, with_label=labelled and not self._original_grid)
        self._random = None
        if mode == "train":
            from monai.transforms import Compose, FgBgToIndicesd, RandCropByPosNegLabeld, SpatialPadd

            # Padding and the foreground/background voxel lists are deterministic, so they are cached too.
            self._prepare = Compose([
                self._prepare,
                SpatialPadd(["image", "label"], spatial_size=self.patch_size),
                FgBgToIndicesd("label", fg_postfix="_fg", bg_postfix="_bg"),
            ])
            crop = RandCropByPosNegLabeld(
                ["image", "label"], "label", self.patch_size, pos=fg_ratio, neg=1.0 - fg_ratio, num_samples=1,
                fg_indices_key="label_fg", bg_indices_key="label_bg", allow_smaller=False,
            )
            self._random = Compose([crop, random_transform]) if random_transform is not None else crop
        # A test split may mix labelled and unlabelled cases: each labelled one is resampled with its label.
        self._prepare_labelled = self._prepare if labelled or self._original_grid else preprocess_transform(
            preprocessing, with_label=True)
        # Failures seen by this process (each DataLoader worker has its own copy; batches carry them out).
        self.failures: dict[int, tuple[str, str]] = {}
        self._cache: dict[int, dict[str, Any]] = {}
        count = math.ceil(cache_rate * len(self.cases))
        if count:
            with ThreadPoolExecutor(max(cache_workers, 1)) as pool:
                for index, item in zip(range(count), pool.map(self._try_prepare, range(count))):
                    if item is not None:
                        self._cache[index] = item

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_volume

    def _try_prepare(self, index: int) -> dict[str, Any] | None:
        try:
            return self._prepared(index)
        except VolumeReadError:
            return None

    def _prepared(self, index: int) -> dict[str, Any]:
        """The preprocessed case ``index`` (from the cache when it is there)."""
        if index in self._cache:
            return self._cache[index]
        if index in self.failures:
            raise VolumeReadError(*self.failures[index])
        try:
            case = self.cases[index]
            item = _load_case(case, self.channels, self.num_classes)
            if self._original_grid:
                prepared = self._prepare({"image": _meta_tensors(item)["image"]})
                if "label" in item:
                    prepared["label"] = item["label"]
                    prepared["affine_original"] = torch.as_tensor(np.asarray(item["affine"]), dtype=torch.float64)
                    prepared["affine_resampled"] = torch.as_tensor(prepared["image"].affine, dtype=torch.float64)
                    if CROP_KEYS[0] in prepared:
                        prepared["crop_box"] = torch.stack([torch.as_tensor(np.asarray(prepared.pop(key)),
                                                                            dtype=torch.int64) for key in CROP_KEYS])
                for key in CROP_KEYS:
                    prepared.pop(key, None)
                return prepared
            return (self._prepare_labelled if case.label is not None else self._prepare)(_meta_tensors(item))
        except VolumeReadError as error:
            self.failures[index] = (error.path, error.reason)
            raise
        except Exception as error:  # a transform failing on odd geometry (e.g. a singular affine when resampling)
            reason = f"preprocessing failed ({type(error).__name__}: {error})"
            self.failures[index] = (self.cases[index].image, reason)
            raise VolumeReadError(self.cases[index].image, reason) from None

    def _sample(self, index: int) -> dict[str, Any]:
        item = self._prepared(index)
        if self._random is None:
            return {"image": item["image"], **{k: item[k] for k in _EVALUATION_KEYS if k in item}}
        # A fresh MONAI random state per patch, drawn from torch's generator: DataLoader seeds that per
        # worker (and seed_everything seeds it in the main process), so workers do not repeat each other.
        self._random.set_random_state(seed=int(torch.randint(0, 2**31 - 1, ()).item()))
        patch = self._random({k: v for k, v in item.items()})
        return patch[0] if isinstance(patch, list) else patch

    def _item(self, sample: dict[str, Any], case_index: int, failed: str) -> dict[str, Any]:
        def plain(t: Any, dtype: torch.dtype) -> torch.Tensor:
            t = t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)
            return t.to(dtype).contiguous()

        label = plain(sample["label"], torch.uint8) if "label" in sample else _EMPTY_LABEL.clone()
        out = {"image": plain(sample["image"], torch.float32), "label": label, "valid": True,
               "case": self.cases[case_index].name, "failed": failed}
        for key in _GRID_KEYS:
            if key in sample:
                out[key] = sample[key]
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        case_index = index // self.samples_per_volume
        try:
            return self._item(self._sample(case_index), case_index, "")
        except VolumeReadError as error:
            failed = str(error)
        if self.mode != "train":
            # Evaluating another case instead would count it twice: skip this one instead.
            return {"image": torch.zeros((self.channels, 0, 0, 0)), "label": _EMPTY_LABEL.clone(), "valid": False,
                    "case": self.cases[case_index].name, "failed": failed}
        for replacement in replacement_indices(case_index, len(self.cases), self.seed):
            try:
                return self._item(self._sample(replacement), replacement, failed)
            except VolumeReadError:
                continue
        raise RuntimeError(f"no readable case in this split of {len(self.cases)} cases; first failure: {failed}")


def _split_cases(cases: list[DecathlonCase], val_fraction: float, fold: int | None, num_folds: int,
                 seed: int) -> tuple[list[DecathlonCase], list[DecathlonCase]]:
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    if fold is not None:
        val_idx = set(order[fold::num_folds])
    else:
        count = round(val_fraction * len(cases))
        if val_fraction > 0:
            count = min(max(count, 1), len(cases) - 1)
        val_idx = set(order[:count])
    train = [c for i, c in enumerate(cases) if i not in val_idx]
    val = [c for i, c in enumerate(cases) if i in val_idx]
    return train, val


class VolumeSegmentationDataModule(SplitDataModule):
    """LightningDataModule for volumetric segmentation in the Decathlon layout (see the module docstring).

    Training batches: ``image`` float ``(B, C, *patch_size)``, ``label`` uint8 ``(B, 1, *patch_size)``,
    ``valid`` bool ``(B,)``, ``case`` and ``failed`` lists. Validation and test batches hold one whole
    preprocessed volume each (batch size 1), for sliding-window inference in the model.

    Args:
        root: dataset root holding ``dataset.json``.
        patch_size: training patch ``(X, Y, Z)`` in voxels (after resampling); also the sliding window.
        batch_size: training patches per batch.
        samples_per_volume: patches drawn from each training case per epoch.
        fg_ratio: fraction of patches centred on a foreground voxel (the rest on background).
        val_fraction: share of the training cases held out for validation (seeded by ``split_seed``);
            0 trains on every case and skips validation (the best checkpoint then needs a validated run).
        fold: instead of ``val_fraction``, validate on fold ``fold`` of ``num_folds`` (seeded as well).
        num_folds: folds of the cross-validation split.
        split_seed: seed of the validation split.
        normalization: ``"zscore"`` (per volume and channel; MRI), ``"window"`` (CT: ``window`` mapped to
            [0, 1] and clipped) or ``"none"``.
        nonzero: z-score over nonzero voxels only (skull-stripped MRI: the zero background stays 0).
        window: ``[low, high]`` intensity window for ``normalization="window"`` (e.g. ``[-175, 250]`` HU).
        spacing: resample every volume to this voxel size in mm ``(X, Y, Z)``; None keeps each file's spacing.
        orientation: reorient every volume to these axis codes first (``"RAS"``: array axes run to the right,
            anterior and superior, so ``depth_axis=2`` is the axial slice axis); None keeps each file's axes.
        crop_foreground: crop every volume to the bounding box of its nonzero voxels first (nnU-Net's crop
            to nonzero: the zero air around a skull-stripped brain is neither sampled as background patches
            nor slid over in inference; the result is padded back with background). A CT keeps its field of
            view (its air is not zero). Labels outside the box are cut away with it.
        augment: random flips, affine transforms and intensity scaling/shifting in training.
        flip_prob: probability of a flip along each axis.
        affine_prob: probability of a random rotation and scaling.
        rotate_degrees: maximum rotation about each axis.
        scale_range: maximum relative zoom (0.1: 0.9-1.1).
        intensity_prob: probability of each intensity augmentation (scale, shift, Gaussian noise).
        cache_rate: fraction of cases kept in memory after loading and preprocessing (1.0 for small datasets).
        cache_workers: threads that fill the cache.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches in page-locked memory (GPU training).
        persistent_workers: keep workers alive between epochs.
        seed: varies the deterministic choice of replacement cases.
    """

    data_error_noun = ("volume", "volumes")
    data_error_adjective = "unusable"  # (readable files whose labels hold values outside the classes fail too)

    def __init__(
        self,
        root: str,
        patch_size: tuple[int, int, int] = (96, 96, 96),
        batch_size: int = 2,
        samples_per_volume: int = 4,
        fg_ratio: float = 0.5,
        val_fraction: float = 0.2,
        fold: int | None = None,
        num_folds: int = 5,
        split_seed: int = 0,
        normalization: Literal["zscore", "window", "none"] = "zscore",
        nonzero: bool = True,
        window: tuple[float, float] | None = None,
        spacing: tuple[float, float, float] | None = None,
        orientation: str | None = None,
        crop_foreground: bool = False,
        augment: bool = True,
        flip_prob: float = 0.5,
        affine_prob: float = 0.2,
        rotate_degrees: float = 15.0,
        scale_range: float = 0.1,
        intensity_prob: float = 0.5,
        cache_rate: float = 1.0,
        cache_workers: int = 2,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(patch_size, (list, tuple)) or len(patch_size) != 3 or any(
            not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in patch_size
        ):
            raise ValueError(f"patch_size must be 3 positive ints (X, Y, Z), e.g. [96, 96, 96], got {patch_size!r}")
        patch_size = tuple(patch_size)
        for name, value in (("batch_size", batch_size), ("samples_per_volume", samples_per_volume),
                            ("num_folds", num_folds)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("fg_ratio", fg_ratio), ("flip_prob", flip_prob), ("affine_prob", affine_prob),
                            ("intensity_prob", intensity_prob), ("cache_rate", cache_rate)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if fold is not None and not 0 <= fold < num_folds:
            raise ValueError(f"fold must be in [0, num_folds={num_folds}) or None, got {fold}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if normalization == "window" and not (_numbers(window, 2) and window[0] < window[1]):
            raise ValueError(f"normalization='window' needs window=[low, high] with low < high, got {window!r}")
        if window is not None and normalization != "window":
            raise ValueError(f"window={window!r} applies only with normalization='window' (got normalization="
                             f"{normalization!r}); drop window or set normalization: window")
        if spacing is not None and not (_numbers(spacing, 3) and all(s > 0 for s in spacing)):
            raise ValueError(f"spacing must be 3 positive voxel sizes in mm (e.g. [1.5, 1.5, 2.0]) or None, "
                             f"got {spacing!r}")
        if orientation is not None and not is_orientation(orientation):
            raise ValueError(f"orientation must be {_ORIENTATION_RULE}, got {orientation!r}")
        if not 0.0 <= scale_range < 1.0:
            raise ValueError(f"scale_range must be in [0, 1) (zoom by 1 +- scale_range), got {scale_range}")
        if rotate_degrees < 0:
            raise ValueError(f"rotate_degrees must be >= 0, got {rotate_degrees}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.patch_size = [int(s) for s in patch_size]
        self.batch_size = batch_size
        self.samples_per_volume = samples_per_volume
        self.fg_ratio = fg_ratio
        self.val_fraction = val_fraction
        self.fold = fold
        self.num_folds = num_folds
        self.split_seed = split_seed
        self.normalization = normalization
        self.nonzero = nonzero
        self.window = [float(v) for v in window] if window is not None else None
        self.spacing = [float(s) for s in spacing] if spacing is not None else None
        self.orientation = orientation.upper() if orientation is not None else None
        if not isinstance(crop_foreground, bool):
            raise TypeError(f"crop_foreground must be a bool, got {crop_foreground!r}")
        self.crop_foreground = crop_foreground
        self.augment = augment
        self.flip_prob = flip_prob
        self.affine_prob = affine_prob
        self.rotate_degrees = rotate_degrees
        self.scale_range = scale_range
        self.intensity_prob = intensity_prob
        self.cache_rate = cache_rate
        self.cache_workers = cache_workers
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.seed = seed
        self._info: DecathlonInfo | None = None

    # dataset.json is read lazily, but before setup(): LightningCLI links data.num_classes into the model.
    @property
    def info(self) -> DecathlonInfo:
        """The parsed ``dataset.json``."""
        if self._info is None:
            self._info = read_decathlon(self.root)
        return self._info

    @property
    def class_names(self) -> list[str]:
        """Label names in label-value order (``dataset.json``'s ``labels``)."""
        return list(self.info.class_names)

    @property
    def num_classes(self) -> int:
        """Number of label values, background included."""
        return len(self.info.class_names)

    @property
    def in_channels(self) -> int:
        """Image channels (``dataset.json``'s ``modality`` entries)."""
        return len(self.info.modalities)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What inference must do to a new volume: plain types, stored in checkpoints."""
        return {
            "normalization": self.normalization,
            "nonzero": bool(self.nonzero),
            "window": list(self.window) if self.window is not None else None,
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "orientation": self.orientation,
            "crop_foreground": self.crop_foreground,
            "patch_size": list(self.patch_size),
            "modalities": list(self.info.modalities),
        }

    def split_cases(self) -> tuple[list[DecathlonCase], list[DecathlonCase]]:
        """(training, validation) cases: the seeded split of ``dataset.json``'s training list.

        Raises:
            ValueError: ``num_folds`` exceeds the training cases (a fold would hold none, or one whose
                Dice says nothing).
        """
        cases = len(self.info.training)
        if self.fold is not None and self.num_folds > cases:
            raise ValueError(f"num_folds={self.num_folds} exceeds the {cases} training cases of dataset.json: some "
                             f"folds would hold no case; use num_folds <= {cases}")
        return _split_cases(self.info.training, self.val_fraction, self.fold, self.num_folds, self.split_seed)

    def random_transform(self) -> Any:
        """The training augmentation applied to each patch (None when ``augment`` is off)."""
        if not self.augment:
            return None
        from monai.transforms import (
            Compose,
            RandAffined,
            RandFlipd,
            RandGaussianNoised,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        keys = ["image", "label"]
        radians = math.radians(self.rotate_degrees)
        return Compose([
            *(RandFlipd(keys, prob=self.flip_prob, spatial_axis=axis) for axis in range(3)),
            RandAffined(keys, prob=self.affine_prob, rotate_range=[radians] * 3, scale_range=[self.scale_range] * 3,
                        mode=("bilinear", "nearest"), padding_mode="zeros"),
            RandScaleIntensityd("image", factors=0.1, prob=self.intensity_prob),
            RandShiftIntensityd("image", offsets=0.1, prob=self.intensity_prob),
            RandGaussianNoised("image", std=0.05, prob=self.intensity_prob),
        ])

    def make_dataset(self, split: str) -> VolumeDataset:
        """Build the dataset of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        train, val = self.split_cases()
        cases = {"train": train, "val": val, "test": self.info.test}[split]
        if split == "val" and not cases:
            if self.fold is None and self.val_fraction == 0:
                raise ValueError(f"{self.root}: val_fraction=0 holds out no validation cases (every case trains); "
                                 "validate with val_fraction > 0 or a fold")
            raise ValueError(f"{self.root}: no validation cases (val_fraction={self.val_fraction}, fold={self.fold})")
        if split == "test" and not cases:
            raise ValueError(f"{self.root}/dataset.json lists no test cases")
        return VolumeDataset(
            cases, split, self.in_channels, self.num_classes, self.preprocessing, self.patch_size,
            random_transform=self.random_transform() if split == "train" else None,
            samples_per_volume=self.samples_per_volume, fg_ratio=self.fg_ratio, cache_rate=self.cache_rate,
            cache_workers=self.cache_workers, seed=self.seed,
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (``fit``, ``validate``, ``test``, ``predict`` or None for all)."""
        if stage in ("fit", None) and "train" not in self.datasets:
            self.datasets["train"] = self.make_dataset("train")
        if stage in ("fit", "validate", None) and "val" not in self.datasets:
            if stage in ("fit", None) and self.fold is None and self.val_fraction == 0:
                self.datasets["val"] = None  # every case trains; validation is skipped
            else:
                self.datasets["val"] = self.make_dataset("val")
        if stage in ("test", "predict", None) and "test" not in self.datasets:
            self.datasets["test"] = self.make_dataset("test")

    def train_dataloader(self) -> DataLoader:
        """Shuffled training patches (``samples_per_volume`` per case per epoch)."""
        return self._loader("train", True, self.batch_size, drop_last=False)

    def val_dataloader(self) -> DataLoader | list:
        """Whole validation volumes, one per batch; none (Lightning then skips validation) when
        ``val_fraction=0`` trains on every case."""
        if self.datasets.get("val", ...) is None:
            return []
        return self._loader("val", False, 1)

    def test_dataloader(self) -> DataLoader:
        """Whole test volumes, one per batch."""
        return self._loader("test", False, 1)

    def predict_dataloader(self) -> DataLoader:
        """Same as :meth:`test_dataloader`."""
        return self.test_dataloader()
