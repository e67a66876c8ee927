"""A small real-MRI tissue-segmentation dataset in the Decathlon layout, cut from the MNI152 template.

nilearn's wheel ships the ICBM 2009a nonlinear symmetric MNI152 template at 1 mm (197 x 233 x 189
voxels) with its gray- and white-matter probability maps, under ``nilearn/datasets/data/``::

    mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz
    mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz
    mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz

:func:`make_mni_tissue` turns them into pseudo-subjects: labels are the most probable tissue per
voxel (0 background/CSF, 1 gray matter, 2 white matter), and each case is a crop of the T1 image
and its labels, resampled through a random rotation, zoom and left-right flip and given a random
bias field, contrast (gamma) change and noise (MONAI transforms). Training cases come from the
posterior part of the brain and test cases from the anterior part, separated by a gap along the
anterior-posterior (Y) axis: no test voxel was ever seen in training. Test entries in
``dataset.json`` carry their labels (``{"image", "label"}``), so ``lightning test`` reports Dice.

nilearn is not an oct3d dependency: install it with ``pip install 'oct3d[mri-demo]'``, or pass
``template_dir`` pointing to a folder with the three files.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["MNI_FILES", "MniTissueSummary", "find_mni_template", "make_mni_tissue", "tissue_labels"]

#: The three template files, by role.
MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
CLASS_NAMES = ("background", "gray matter", "white matter")


def find_mni_template(template_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the T1, gray- and white-matter files (:data:`MNI_FILES`), from ``template_dir`` or nilearn.

    nilearn is located without importing it (its import pulls in scikit-learn and pandas).

    Raises:
        FileNotFoundError: nilearn is not installed and no ``template_dir`` was given, or a file is missing.
    """
    if template_dir is None:
        spec = importlib.util.find_spec("nilearn")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "the MNI152 template comes with nilearn, which is not installed: pip install 'oct3d[mri-demo]' "
                "(or pip install nilearn), or pass a folder holding " + ", ".join(MNI_FILES.values())
            )
        template_dir = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    folder = Path(template_dir)
    paths = {role: folder / name for role, name in MNI_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"MNI152 template file(s) not found: {', '.join(missing)}")
    return paths


def tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """The most probable tissue per voxel: 0 background (CSF and outside), 1 gray, 2 white matter (uint8).

    ``gm`` and ``wm`` are probabilities in [0, 1]; background is what they leave, ``1 - gm - wm``.
    """
    background = np.clip(1.0 - gm - wm, 0.0, 1.0)
    return np.argmax(np.stack([background, gm, wm]), axis=0).astype(np.uint8)


@dataclass(frozen=True)
class MniTissueSummary:
    """What :func:`make_mni_tissue` wrote.

    Attributes:
        root: the dataset root.
        train_cases: number of training cases.
        test_cases: number of test cases.
        crop_size: voxels per case ``(X, Y, Z)``.
        train_y: the template's Y (posterior-anterior) voxel range ``[start, stop)`` training crops came from.
        test_y: the same for test crops (disjoint from ``train_y``).
        label_fractions: share of background, gray and white matter voxels over all cases.
    """

    root: Path
    train_cases: int
    test_cases: int
    crop_size: tuple[int, int, int]
    train_y: tuple[int, int]
    test_y: tuple[int, int]
    label_fractions: tuple[float, float, float]


def _augmenters(crop_size: tuple[int, int, int], rotate_degrees: float, zoom: float):
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandAffined,
        RandBiasField,
        RandFlipd,
        RandGaussianNoise,
    )

    radians = np.deg2rad(rotate_degrees)
    spatial = Compose([
        # The stack is T1 + gray + white probability: resampled together, labels are taken afterwards.
        RandAffined(["stack"], prob=1.0, spatial_size=crop_size, rotate_range=[radians] * 3,
                    scale_range=[zoom] * 3, mode="bilinear", padding_mode="zeros"),
        RandFlipd(["stack"], prob=0.5, spatial_axis=0),
    ])
    intensity = Compose([
        RandBiasField(prob=1.0, coeff_range=(0.0, 0.2)),
        RandAdjustContrast(prob=1.0, gamma=(0.8, 1.25)),
        RandGaussianNoise(prob=1.0, std=0.02),
    ])
    return spatial, intensity


def make_mni_tissue(
    out: str | os.PathLike,
    train_cases: int = 24,
    test_cases: int = 6,
    crop_size: tuple[int, int, int] = (64, 64, 64),
    split: float = 0.6,
    gap: int = 8,
    rotate_degrees: float = 10.0,
    zoom: float = 0.1,
    seed: int = 0,
    template_dir: str | os.PathLike | None = None,
) -> MniTissueSummary:
    """Write a Decathlon-layout tissue dataset of MNI152 pseudo-subjects to ``out`` (see the module docstring).

    Args:
        out: dataset root (created; existing case files are overwritten).
        train_cases: training pseudo-subjects (imagesTr/labelsTr).
        test_cases: test pseudo-subjects (imagesTs/labelsTs, listed with labels in dataset.json).
        crop_size: voxels per case ``(X, Y, Z)`` at the template's 1 mm.
        split: where, as a fraction of the brain's Y extent from posterior, training regions end and
            test regions begin.
        gap: voxels of Y left unused between the two regions.
        rotate_degrees: maximum random rotation about each axis.
        zoom: maximum relative random zoom.
        seed: seed of crop positions and augmentation.
        template_dir: folder with the template files (default: nilearn's bundled copy).

    Returns:
        a :class:`MniTissueSummary`.

    Raises:
        FileNotFoundError: no template (see :func:`find_mni_template`).
        ValueError: bad sizes, or a region too small for ``crop_size``.
    """
    import nibabel as nib
    import torch

    crop = tuple(int(s) for s in crop_size)
    if len(crop) != 3 or min(crop) < 4:
        raise ValueError(f"crop_size must be 3 ints >= 4, got {crop_size!r}")
    if train_cases < 1 or test_cases < 0:
        raise ValueError(f"train_cases must be >= 1 and test_cases >= 0, got {train_cases}, {test_cases}")
    if not 0.0 < split < 1.0:
        raise ValueError(f"split must be in (0, 1), got {split}")
    paths = find_mni_template(template_dir)
    t1_image = nib.load(str(paths["t1"]))
    t1 = np.asarray(t1_image.dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(str(paths["gm"])).dataobj, dtype=np.float32)
    wm = np.asarray(nib.load(str(paths["wm"])).dataobj, dtype=np.float32)
    if not t1.shape == gm.shape == wm.shape or t1.ndim != 3:
        raise ValueError(f"template files differ in shape: {t1.shape}, {gm.shape}, {wm.shape}")
    if any(c > n for c, n in zip(crop, t1.shape)):
        raise ValueError(f"crop_size {crop} is larger than the template ({t1.shape} voxels at 1 mm)")
    # Probability maps are stored as 0..255 (uint8) in nilearn's copy, 0..1 elsewhere.
    scale = 255.0 if max(gm.max(), wm.max()) > 1.5 else 1.0
    gm, wm = gm / scale, wm / scale
    t1 = t1 / max(float(t1.max()), 1e-6)
    brain = (gm + wm) > 0.5
    ys = np.where(brain.any(axis=(0, 2)))[0]
    if ys.size == 0:
        raise ValueError("the gray/white matter maps hold no brain voxel")
    boundary = int(ys[0] + split * (ys[-1] - ys[0]))
    train_y = (0, boundary - gap // 2)
    test_y = (boundary + (gap - gap // 2), t1.shape[1])
    # Each case is resampled from a source box 25% larger than the crop, which holds the rotated,
    # zoomed crop (corners aside); the box lies inside its region, so regions never share a voxel.
    box = [min(round(s * 1.25), t1.shape[a]) for a, s in enumerate(crop)]
    for name, (start, stop) in (("training", train_y), ("test", test_y)):
        if stop - start < box[1]:
            raise ValueError(f"the {name} region spans {stop - start} voxels in Y, fewer than the {box[1]} a "
                             f"crop of {crop} needs; lower crop_size or move split")
    rng = np.random.default_rng(seed)
    spatial, intensity = _augmenters(crop, rotate_degrees, zoom)
    stack = np.stack([t1, gm, wm])
    root = Path(out)
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        # An earlier run's cases would stay beside this run's (and `oct3d segment imagesTs` would label them).
        for stale in (root / folder).glob("mni_t[rs]_*.nii.gz"):
            stale.unlink()
    counts = np.zeros(3, dtype=np.int64)
    entries: dict[str, list] = {"training": [], "test": []}
    jobs = [("training", i, train_y) for i in range(train_cases)] + [("test", i, test_y) for i in range(test_cases)]
    for kind, i, (y_start, y_stop) in jobs:
        # A box centred on a brain voxel: draw centres until one is (the template is mostly brain).
        for _ in range(1000):
            corner = [int(rng.integers(0, t1.shape[0] - box[0] + 1)), int(rng.integers(y_start, y_stop - box[1] + 1)),
                      int(rng.integers(0, t1.shape[2] - box[2] + 1))]
            centre = tuple(c + b // 2 for c, b in zip(corner, box))
            if brain[centre]:
                break
        region = tuple(slice(c, c + b) for c, b in zip(corner, box))
        case_seed = int(rng.integers(0, 2**31 - 1))
        spatial.set_random_state(seed=case_seed)
        intensity.set_random_state(seed=case_seed + 1)
        moved = spatial({"stack": torch.from_numpy(np.ascontiguousarray(stack[(slice(None), *region)]))})["stack"]
        moved = moved.as_tensor() if hasattr(moved, "as_tensor") else moved
        image = intensity(moved[:1]).clamp_min(0)
        image = image * float(rng.uniform(0.7, 1.4))  # scanner-dependent global scale
        labels = tissue_labels(moved[1].numpy(), moved[2].numpy())
        counts += np.bincount(labels.ravel(), minlength=3)
        # The crop's own grid in MNI space: the template's affine shifted to the box's corner.
        affine = t1_image.affine.copy()
        affine[:3, 3] = t1_image.affine[:3, :3] @ (np.asarray(corner) + (np.asarray(box) - np.asarray(crop)) / 2) \
            + t1_image.affine[:3, 3]
        tr = kind == "training"
        name = f"mni_{'tr' if tr else 'ts'}_{i:03d}.nii.gz"
        image_path = f"imagesTr/{name}" if tr else f"imagesTs/{name}"
        label_path = f"labelsTr/{name}" if tr else f"labelsTs/{name}"
        nib.save(nib.Nifti1Image(image[0].numpy().astype(np.float32), affine), str(root / image_path))
        nib.save(nib.Nifti1Image(labels, affine), str(root / label_path))
        entries[kind].append({"image": f"./{image_path}", "label": f"./{label_path}"})
    meta = {
        "name": "MNITissue",
        "description": "Pseudo-subjects cut from the ICBM 2009a nonlinear symmetric MNI152 template (nilearn): "
                       f"training crops from template Y voxels [{train_y[0]}, {train_y[1]}), test crops from "
                       f"[{test_y[0]}, {test_y[1]}); labels = most probable tissue of the template's probability maps",
        "reference": "Fonov et al., NeuroImage 2011; Fonov et al., NeuroImage 2009 (ICBM 2009a)",
        "tensorImageSize": "3D",
        "modality": {"0": "T1"},
        "labels": {str(i): name for i, name in enumerate(CLASS_NAMES)},
        "numTraining": train_cases,
        "numTest": test_cases,
        "training": entries["training"],
        "test": entries["test"],
    }
    with open(root / "dataset.json", "w") as handle:
        json.dump(meta, handle, indent=2)
    fractions = tuple(float(c) for c in counts / max(int(counts.sum()), 1))
    return MniTissueSummary(root, train_cases, test_cases, crop, train_y, test_y, fractions)  # type: ignore[arg-type]
