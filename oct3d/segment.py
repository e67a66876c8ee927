"""Segment NIfTI volumes with a checkpoint from ``lightning fit`` (a :class:`~oct3d.lightning.VolumeSegmenter`).

``python tools/segment.py --checkpoint CKPT --output-dir DIR PATH...`` (also ``oct3d segment``)
writes, for every input volume, a uint8 NIfTI label map of the same file name into ``DIR``, with
the input's spatial shape, affine and header. Inference is MONAI's sliding window with overlap
and Gaussian blending, on the checkpoint's patch size, after the checkpoint's own preprocessing
(intensity normalisation, resampling; predictions are resampled back onto the input grid). One
JSON line per input goes to ``--output`` (or stdout)::

    {"path": "a.nii.gz", "output": "DIR/a.nii.gz", "shape": [64, 64, 64], "voxels": {"gray": 812, ...}, "seconds": 1.2}
    {"path": "b.nii.gz", "error": "b.nii.gz: unreadable (EOFError: ...)"}

A file that cannot be read gets an error line and no output file, and the others go on. The exit
status is 0 when every file succeeded, 1 when any failed, 2 for usage errors (bad checkpoint,
no inputs). Folders are searched recursively for ``.nii`` / ``.nii.gz`` files; their relative
paths are kept under ``DIR``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from oct3d.inference import (
    CheckpointError,
    _load_checkpoint_dict,
    check_checkpoint_file,
    resolve_device,
    split_inputs,
)

__all__ = ["Segmenter", "find_volumes", "load_segmenter", "segment_files", "main"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_nifti(path: Path) -> bool:
    # Dot-files are skipped: macOS's AppleDouble "._case.nii.gz" companions ship in MSD tarballs.
    return path.name.lower().endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


class Segmenter:
    """A loaded segmentation model; :meth:`segment` turns a NIfTI file into a label map. See :func:`load_segmenter`.

    Attributes:
        module: the :class:`~oct3d.lightning.VolumeSegmenter`, in eval mode on :attr:`device`.
        class_names: label names in label order.
        preprocessing: what the training data module did to each volume (normalisation, spacing, patch size).
        device: where the model runs.
    """

    def __init__(self, module: Any, device: torch.device, amp: bool = True) -> None:
        self.module = module
        self.device = device
        self.amp = amp and device.type == "cuda"
        self.class_names: list[str] = list(module.class_names or [str(i) for i in range(module.hparams.num_classes)])
        self.preprocessing: dict[str, Any] = dict(module.preprocessing)
        self.in_channels = int(module.hparams.in_channels)

    @torch.inference_mode()
    def probabilities(self, path: str | os.PathLike, overlap: float | None = None, mirror: bool = False,
                      sw_batch_size: int | None = None) -> tuple[torch.Tensor, Any]:
        """Class probabilities ``(num_classes, X, Y, Z)`` on the grid of the file at ``path``, and its nibabel image.

        ``mirror`` averages the softmax over the volume and its mirror images along every subset of
        the three axes (nnU-Net's test-time mirroring: 8 passes); ``sw_batch_size`` sets the sliding
        windows per forward pass (default: the checkpoint's).

        Raises:
            datamodules.volume.VolumeReadError: the file cannot be read or has the wrong number of channels.
        """
        import nibabel as nib
        from monai.data import MetaTensor

        from datamodules.volume import load_nifti, preprocess_transform

        data, affine = load_nifti(path, self.in_channels)
        transform = preprocess_transform(self.preprocessing, with_label=False)
        item = transform({"image": MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(affine))})
        image = item["image"]
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
        volume = image.as_tensor()[None].to(self.device)
        flips = [axes for count in range(4) for axes in itertools.combinations((2, 3, 4), count)] if mirror else [()]
        probs = None
        for axes in flips:
            with autocast:
                logits = self.module.sliding_window(volume.flip(axes) if axes else volume, overlap, sw_batch_size)
            part = logits.float().softmax(1)
            part = part.flip(axes) if axes else part
            probs = part if probs is None else probs.add_(part)
        probs = (probs[0] / len(flips)).cpu()
        prep = self.preprocessing
        if prep.get("spacing") or prep.get("orientation") or prep.get("crop_foreground"):
            # Back onto the input grid through MONAI's record of the crop, reorientation and resampling it did.
            resampled = MetaTensor(probs, affine=image.affine, applied_operations=list(image.applied_operations))
            probs = transform.inverse({"image": resampled})["image"].as_tensor()
            if prep.get("crop_foreground"):
                # The crop's inverse pads with zeros: outside the box every voxel is background.
                probs[0] += probs.sum(0) == 0
        return probs, nib.load(str(path))

    def segment(self, path: str | os.PathLike, output: str | os.PathLike, overlap: float | None = None,
                mirror: bool = False, sw_batch_size: int | None = None, save_probabilities: bool = False) -> dict:
        """Write the uint8 label map of ``path`` to ``output`` (same shape, affine and header); a result dict.

        ``save_probabilities`` also writes the float32 class probabilities ``(X, Y, Z, num_classes)``
        beside it, as ``<name>_probabilities.nii.gz`` (the 4D layout of a multi-channel NIfTI); see
        :meth:`probabilities` for ``mirror`` and ``sw_batch_size``.
        """
        import nibabel as nib
        import numpy as np

        start = time.perf_counter()
        probs, source = self.probabilities(path, overlap, mirror, sw_batch_size)
        labels = probs.argmax(0).numpy().astype(np.uint8)
        header = source.header.copy()
        header.set_data_dtype(np.uint8)
        out_image = type(source)(labels, source.affine, header=header) if isinstance(source, nib.Nifti1Image) \
            else nib.Nifti1Image(labels, source.affine, header=header)
        # Labels are stored as they are: no intensity scaling, display range or intent inherited from the
        # input's header (a viewer honouring an inherited cal_max of 900 would show a 0..2 map as black).
        out_image.header.set_slope_inter(1.0, 0.0)
        if isinstance(out_image, nib.Nifti1Image):  # (Nifti2Image subclasses it)
            out_image.header["cal_min"], out_image.header["cal_max"] = 0, len(self.class_names) - 1
            out_image.header.set_intent("label")
        output = Path(output)
        _save_atomically(out_image, output)
        result: dict[str, Any] = {}
        if save_probabilities:
            maps = output.with_name(f"{_nifti_stem(output)}_probabilities.nii.gz")
            header = source.header.copy() if isinstance(source, nib.Nifti1Image) else None
            probability_image = nib.Nifti1Image(np.moveaxis(probs.numpy(), 0, -1).astype(np.float32), source.affine,
                                                header=header)
            probability_image.header.set_data_dtype(np.float32)
            # Probabilities as stored, displayed 0..1, no intensity scaling or intent inherited from the image.
            probability_image.header.set_slope_inter(1.0, 0.0)
            probability_image.header["cal_min"], probability_image.header["cal_max"] = 0, 1
            probability_image.header.set_intent("none")
            _save_atomically(probability_image, maps)
            result["probabilities"] = str(maps)
        counts = np.bincount(labels.ravel(), minlength=len(self.class_names))
        return {
            "path": str(path),
            "output": str(output),
            **result,
            "shape": list(labels.shape),
            "voxels": {name: int(counts[i]) for i, name in enumerate(self.class_names)},
            "seconds": round(time.perf_counter() - start, 3),
        }


def _nifti_stem(path: Path) -> str:
    """The file name without its ``.nii``/``.nii.gz`` suffix."""
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    return path.name[: -len(suffix)]


def _save_atomically(image: Any, output: Path) -> None:
    """``nib.save`` under a temporary name, then renamed: a failure never leaves a partial file behind."""
    import nibabel as nib

    output.parent.mkdir(parents=True, exist_ok=True)
    stem = _nifti_stem(output)
    partial = output.with_name(f".partial-{os.getpid()}-{stem}{output.name[len(stem):]}")
    try:
        nib.save(image, str(partial))
        os.replace(partial, output)
    finally:
        if partial.exists():
            partial.unlink()


def load_segmenter(path: str | os.PathLike, device: str = "auto", trust_checkpoint: bool = False,
                   amp: bool = True) -> Segmenter:
    """Load a :class:`~oct3d.lightning.VolumeSegmenter` checkpoint written by ``lightning fit``.

    Args:
        path: the ``.ckpt`` file (read with ``torch.load(weights_only=True)``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        trust_checkpoint: allow full unpickling when ``weights_only`` loading refuses the file.
        amp: float16 autocast on CUDA.

    A backbone trained with ``VolumeSegmenter(octavize=...)`` is rebuilt from its recorded
    ``{class_path, init_args}`` (or registry name), converted again by ``oct3d.octavize`` with the
    recorded settings and example size, and then given the trained weights.

    Raises:
        CheckpointError: missing file, not an oct3d segmentation checkpoint, or a backbone that cannot be rebuilt.
    """
    from oct3d.lightning.modules import CHECKPOINT_FORMAT_VERSION, CHECKPOINT_KEY
    from oct3d.lightning.segmentation import VolumeSegmenter

    path = check_checkpoint_file(path)
    torch_device = resolve_device(device)
    checkpoint = _load_checkpoint_dict(path, trust_checkpoint)
    meta = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not an oct3d checkpoint: expected a Lightning checkpoint from "
                              f"`lightning fit` with 'state_dict' and '{CHECKPOINT_KEY}' entries")
    if meta.get("task") != "segmentation":
        raise CheckpointError(f"{path} holds a {meta.get('task')!r} model, not a segmentation model; "
                              "use `oct3d infer` for classifiers")
    if int(meta.get("format_version", 0)) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')} is newer than this oct3d")
    backbone_kwargs = dict(meta.get("backbone_kwargs") or {})
    if int(meta.get("format_version", 0)) < 2 and meta.get("backbone") == "oct_unet3d":
        # Format 1 recorded only the arguments given; oct_unet3d's base_width defaulted to 16 then.
        backbone_kwargs.setdefault("base_width", 16)
    try:
        module = VolumeSegmenter(
            backbone=meta["backbone"], backbone_kwargs=backbone_kwargs or None,
            in_channels=int(meta["in_channels"]), num_classes=int(meta["num_classes"]),
            class_names=meta.get("class_names"), depth_axis=meta.get("depth_axis"),
            overlap=float(meta.get("overlap", 0.5)), preprocessing=meta.get("preprocessing"),
            # The recorded conversion (example_size included) rebuilds the trained octave network exactly.
            octavize=meta.get("octavize"),
        )
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot rebuild the model ({error})") from error
    if not module.preprocessing.get("patch_size"):
        raise CheckpointError(f"{path}: the checkpoint has no patch size (preprocessing.patch_size)")
    model_state = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    expected = {k for k in module.state_dict() if k.startswith("model.")}
    missing, unexpected = sorted(expected - set(model_state)), sorted(set(model_state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: the weights do not match the rebuilt model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    try:
        module.load_state_dict(model_state, strict=False)
    except RuntimeError as error:  # same names, other shapes
        raise CheckpointError(f"{path}: the weights do not match the rebuilt model ({str(error)[:300]})") from error
    module.eval().to(torch_device)
    return Segmenter(module, torch_device, amp)


def find_volumes(
    paths: Iterable[str | os.PathLike], exclude: str | os.PathLike | None = None
) -> list[tuple[Path, Path]]:
    """``(file, relative output name)`` for each input: files as given, folders searched for NIfTI files.

    A folder search skips everything under ``exclude`` (the output folder: inside an input folder,
    an earlier run's label maps would otherwise be segmented again).

    Raises:
        FileNotFoundError: a path does not exist.
    """
    excluded = None if exclude is None else Path(exclude).resolve()
    found: list[tuple[Path, Path]] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            root = path.resolve()
            # Only a folder strictly inside this one is skipped: the output folder being the input
            # folder itself is refused by the caller, and one above it holds no earlier output here.
            skip = excluded if excluded is not None and excluded != root and excluded.is_relative_to(root) else None
            found.extend(
                (p, p.relative_to(path)) for p in sorted(path.rglob("*"))
                if p.is_file() and _is_nifti(p) and not (skip is not None and p.resolve().is_relative_to(skip))
            )
        elif path.exists():
            found.append((path, Path(path.name)))
        else:
            raise FileNotFoundError(f"input path {path} does not exist")
    return found


def segment_files(segmenter: Segmenter, inputs: Sequence[tuple[Path, Path]], output_dir: str | os.PathLike,
                  overlap: float | None = None, mirror: bool = False, sw_batch_size: int | None = None,
                  save_probabilities: bool = False) -> Iterator[dict[str, Any]]:
    """Segment each input into ``output_dir / name``; yields one result (or ``{"path", "error"}``) per input.

    ``mirror``, ``sw_batch_size`` and ``save_probabilities`` are :meth:`Segmenter.segment`'s.
    """
    from datamodules.volume import VolumeReadError

    output_dir = Path(output_dir)
    written: set[Path] = set()
    input_files = {path.resolve() for path, _ in inputs}
    for path, name in inputs:
        target = output_dir / name
        if target in written:
            yield {"path": str(path), "error": f"{path}: another input already wrote {target}"}
            continue
        if target.resolve() in input_files:
            yield {"path": str(path), "error": f"{path}: its label map {target} would overwrite an input volume"}
            continue
        try:
            result = segmenter.segment(path, target, overlap, mirror, sw_batch_size, save_probabilities)
        except VolumeReadError as error:
            yield {"path": str(path), "error": str(error)}
            continue
        except (RuntimeError, ValueError, OSError) as error:  # e.g. a volume the network cannot take
            yield {"path": str(path), "error": f"{path}: {type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            continue
        written.add(target)
        yield result


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``tools/segment.py`` / ``oct3d segment``."""
    parser = argparse.ArgumentParser(prog="oct3d segment",
                                     description="Segment NIfTI volumes with an oct3d segmentation checkpoint.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help=".nii/.nii.gz files, or folders searched recursively")
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt from `lightning fit` (VolumeSegmenter)")
    parser.add_argument("--output-dir", required=True, help="where the label maps go (same file names as the inputs)")
    parser.add_argument("--output", help="write the JSON lines here (default: stdout)")
    parser.add_argument("--overlap", type=float, help="sliding-window overlap in [0, 1) (default: the checkpoint's)")
    parser.add_argument("--sw-batch-size", type=int,
                        help="sliding windows per forward pass (default: the checkpoint's); more is faster on a GPU")
    parser.add_argument("--mirror", action="store_true",
                        help="test-time mirroring: average over the volume flipped along every subset of its axes "
                             "(8 passes, as nnU-Net)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write <name>_probabilities.nii.gz: float32 class probabilities (X, Y, Z, classes)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--no-amp", action="store_true", help="disable float16 autocast on CUDA")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow full unpickling of a checkpoint that weights_only loading refuses")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 if every file succeeded, 1 if any failed, 2 on usage errors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    from oct3d.system import steady_malloc_unless_disabled

    steady_malloc_unless_disabled()  # large clips/volumes: no page faults every batch (OCT3D_STEADY_MALLOC=0: off)
    if args.overlap is not None and not 0.0 <= args.overlap < 1.0:
        parser.error(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.sw_batch_size is not None and args.sw_batch_size < 1:
        parser.error(f"--sw-batch-size must be >= 1, got {args.sw_batch_size}")
    try:
        import monai  # noqa: F401
        import nibabel  # noqa: F401
    except ImportError as error:
        print(f"error: `oct3d segment` needs MONAI and nibabel: pip install 'oct3d[medical]' ({error})",
              file=sys.stderr)
        return 2
    present, missing = split_inputs(parser, args)
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output-dir {args.output_dir} is a file; give a folder (it is created if absent)")
    try:
        segmenter = load_segmenter(args.checkpoint, args.device, args.trust_checkpoint, amp=not args.no_amp)
        inputs = find_volumes(present, exclude=args.output_dir)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    input_files = {path.resolve() for path, _ in inputs}
    clash = next((path for path, name in inputs if (Path(args.output_dir) / name).resolve() in input_files), None)
    if clash is not None:
        print(f"error: --output-dir {args.output_dir} would overwrite the input {clash} with its label map; "
              "choose an output folder apart from the inputs", file=sys.stderr)
        return 2
    if not inputs and not missing:
        print(f"error: no .nii/.nii.gz files under {' '.join(args.paths)}", file=sys.stderr)
        return 2
    failed = total = 0
    to_file = args.output and args.output != "-"
    handle = open(args.output, "w") if to_file else sys.stdout  # noqa: SIM115 - closed below, written per line
    try:
        for result in [{"path": p, "error": "does not exist"} for p in missing]:
            total += 1
            failed += 1
            handle.write(json.dumps(result) + "\n")
        for result in segment_files(segmenter, inputs, args.output_dir, args.overlap, args.mirror, args.sw_batch_size,
                                    args.save_probabilities) if inputs else ():
            total += 1
            failed += "error" in result
            handle.write(json.dumps(result) + "\n")
            handle.flush()
    finally:
        if handle is not sys.stdout:
            handle.close()
    if failed:
        print(f"{failed} of {total} files failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
