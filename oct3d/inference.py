"""Inference over video files (or images, for 2D models) from a training checkpoint or an exported model.

``python tools/infer.py --checkpoint CKPT PATH...`` (also ``oct3d infer``) writes one JSON line per
input file::

    {"path": "a.mp4", "topk": [{"label": "moving left", "score": 0.97}, ...]}
    {"path": "b.mp4", "error": "b.mp4: truncated: ..."}

With ``--window SEC --hop SEC`` a line also holds ``"segments": [{"start", "end", "topk"}, ...]``
(its ``topk`` is the average over the segments). Without ``--output`` a table goes to stdout;
``--output -`` writes the JSON lines to stdout instead.
The exit status is 0 when every file succeeded, 1 when any failed (all others are still written),
2 for usage errors (bad checkpoint, no input files).

``CKPT`` is a Lightning checkpoint written by ``lightning fit`` (it carries the backbone, class
names and preprocessing; read with ``torch.load(weights_only=True)``) or a file written by
``tools/export.py`` (``.onnx``, TorchScript ``.pt``, ``torch.export`` ``.pt2``) next to its
``<file>.json`` sidecar.
"""

from __future__ import annotations

import argparse
import bisect
import codecs
import itertools
import json
import math
import numbers
import os
import pickle
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from datamodules.decoders import DECODERS, require_decoder
from datamodules.video import VIDEO_EXTENSIONS, find_videos

__all__ = [
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "CheckpointError",
    "ModelMetadata",
    "Predictor",
    "load_predictor",
    "find_inputs",
    "split_inputs",
    "plan_segments",
    "predict_files",
    "main",
]

# VIDEO_EXTENSIONS is the data modules' list (datamodules.video), so infer reads every container they train on.
#: The image files inference reads: those ``torchvision.datasets.ImageFolder`` trains on (decoded with PIL alike).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: views -> (temporal clips, spatial crops): 30 is the Kinetics 10-clip x 3-crop test protocol.
VIEW_LAYOUTS = {1: (1, 1), 3: (1, 3), 10: (10, 1), 30: (10, 3)}


#: A view setting: a key of :data:`VIEW_LAYOUTS` or a ``(clips, crops)`` pair (see :func:`view_layout`).
Views = int | tuple[int, int]


def view_layout(views: Views) -> tuple[int, int]:
    """``(temporal clips, spatial crops)`` of ``views``: a key of :data:`VIEW_LAYOUTS`, or a
    ``(clips, crops)`` pair with ``clips >= 1`` and ``crops`` 1 (center) or 3 (left, center, right).

    Raises:
        ValueError: anything else.
    """
    if isinstance(views, (tuple, list)):
        if (len(views) == 2 and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in views)
                and views[0] >= 1 and views[1] in (1, 3)):
            return int(views[0]), int(views[1])
        raise ValueError(f"views as (clips, crops) needs clips >= 1 and crops 1 or 3, got {views}")
    if not isinstance(views, numbers.Integral) or isinstance(views, bool):
        raise ValueError(f"views must be one of {sorted(VIEW_LAYOUTS)} or a (clips, crops) pair, got {views!r}")
    if views not in VIEW_LAYOUTS:
        raise ValueError(f"views must be one of {sorted(VIEW_LAYOUTS)} or a (clips, crops) pair, got {views}")
    return VIEW_LAYOUTS[int(views)]
EXPORT_FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".pt2": "exported-program"}


class CheckpointError(ValueError):
    """The model file is not an oct3d checkpoint or export, or cannot be read safely."""


@dataclass
class ModelMetadata:
    """What inference needs to know about a model besides its weights.

    Attributes:
        task: ``"video"`` or ``"image"``.
        backbone: registered model name.
        backbone_kwargs: builder arguments other than ``num_classes``.
        num_classes: classifier outputs.
        class_names: labels in class-index order (``None``: labels are printed as indices).
        preprocessing: ``num_frames``, ``sampling_rate``, ``target_fps``, ``crop_size``, ``short_side``,
            ``test_clips``, ``test_crops`` (video) or ``crop_size``, ``resize_size`` (image), and ``mean``, ``std``.
    """

    task: str
    backbone: str
    backbone_kwargs: dict[str, Any]
    num_classes: int
    class_names: list[str] | None
    preprocessing: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, meta: dict[str, Any]) -> ModelMetadata:
        """Build from the ``checkpoint["oct3d"]`` / sidecar dictionary."""
        try:
            return cls(
                task=str(meta["task"]),
                backbone=str(meta["backbone"]),
                backbone_kwargs=dict(meta.get("backbone_kwargs") or {}),
                num_classes=int(meta["num_classes"]),
                class_names=list(meta["class_names"]) if meta.get("class_names") is not None else None,
                preprocessing=dict(meta.get("preprocessing") or {}),
            )
        except KeyError as error:
            raise CheckpointError(f"oct3d metadata lacks the entry {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dictionary (the inverse of :meth:`from_dict`)."""
        return {
            "task": self.task,
            "backbone": self.backbone,
            "backbone_kwargs": dict(self.backbone_kwargs),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "preprocessing": dict(self.preprocessing),
        }

    def label(self, index: int) -> str:
        """The name of class ``index`` (its number when the model has no class names)."""
        return self.class_names[index] if self.class_names else str(index)

    def input_shape(self, batch_size: int = 1) -> tuple[int, ...]:
        """Shape of a model input batch: ``(B, 3, T, S, S)`` for video, ``(B, 3, S, S)`` for images."""
        crop = int(self.preprocessing.get("crop_size", 224))
        channels = int(self.backbone_kwargs.get("in_channels", 3))
        if self.task == "video":
            return (batch_size, channels, int(self.preprocessing.get("num_frames", 8)), crop, crop)
        return (batch_size, channels, crop, crop)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"`` without a GPU is a clear error."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for but CUDA is not available")
    return torch.device(device)


class Predictor:
    """A loaded model: call it with a preprocessed batch to get logits ``(B, num_classes)`` on the CPU.

    Use :func:`load_predictor` to create one.

    Attributes:
        metadata: the model's :class:`ModelMetadata`.
        device: where the model runs.
        source: ``"checkpoint"``, ``"onnx"``, ``"torchscript"`` or ``"exported-program"``.
    """

    def __init__(self, run: Any, metadata: ModelMetadata, device: torch.device, source: str, amp: bool = True):
        self._run = run
        self.metadata = metadata
        self.device = device
        self.source = source
        self.amp = amp and device.type == "cuda" and source != "onnx"

    @torch.inference_mode()
    def __call__(self, batch: Tensor) -> Tensor:
        """Logits for a float batch shaped like :meth:`ModelMetadata.input_shape`."""
        if self.source == "onnx":
            session = self._run
            name = session.get_inputs()[0].name
            return torch.from_numpy(session.run(None, {name: batch.numpy().astype("float32")})[0]).float()
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
        with autocast:
            out = self._run(batch.to(self.device, non_blocking=True))
        return out.float().cpu()


def _looks_like_torch_file(path: Path) -> bool:
    """Whether ``path`` starts like a file ``torch.save`` writes: a zip archive, or (the legacy format) a pickle."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return True  # let torch.load report it
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _load_checkpoint_dict(path: Path, trust: bool) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not _looks_like_torch_file(path):
            # A refusal would tell the user to turn the safety off for a file that is no checkpoint at all.
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)") from error
        if not trust:
            raise CheckpointError(
                f"{path}: holds objects that torch.load(weights_only=True) refuses ({str(error).splitlines()[0]}); "
                "pass --trust-checkpoint to load it with full unpickling if you trust its source"
            ) from error
    except Exception as error:  # zip/format errors: not a torch file at all
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(error).__name__}: {error})") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # full unpickling of something that is not a checkpoint at all
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(error).__name__}: {error})") from error


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _is_torchscript(path: Path) -> bool:
    """Whether a ``.pt`` file is a TorchScript archive (``tools/export.py --format torchscript``), not a checkpoint."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it is a file; else a ``CheckpointError`` that says what it is instead.

    A folder (a run's log folder, say) gets a hint naming the ``.ckpt`` files a few levels below it.
    """
    path = Path(path)
    if path.is_dir():
        # A few levels deep only (a run folder's checkpoints/), not a walk of a whole dataset tree.
        found = sorted(p for depth in range(4) for p in path.glob("*/" * depth + "*.ckpt"))
        hint = f" (it holds {len(found)} .ckpt files, e.g. {found[0]})" if found else ""
        raise CheckpointError(f"checkpoint {path} is a folder; give the checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load_predictor(path: str | os.PathLike, device: str = "auto", trust_checkpoint: bool = False,
                   amp: bool = True) -> Predictor:
    """Load a Lightning checkpoint from ``lightning fit`` or a model from ``tools/export.py``.

    Args:
        path: ``.ckpt`` checkpoint, or ``.onnx`` / ``.pt`` / ``.pt2`` export with its ``<file>.json`` sidecar.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        trust_checkpoint: allow full unpickling when ``weights_only`` loading refuses the file.
        amp: float16 autocast on CUDA (torch models).

    Raises:
        CheckpointError: the file is missing, not ours, or not loadable safely.
    """
    path = check_checkpoint_file(path)
    torch_device = resolve_device(device)
    sidecar = _sidecar(path)
    if sidecar.is_file() and (path.suffix in EXPORT_FORMATS or _is_export_sidecar(sidecar)):
        # The sidecar names the format, so an export saved under another suffix loads too.
        return _load_export(path, sidecar, torch_device, amp)
    if path.suffix in EXPORT_FORMATS and (path.suffix != ".pt" or _is_torchscript(path)):
        raise CheckpointError(f"{path}: exported model without its metadata sidecar {sidecar}")
    from oct3d.lightning.modules import CHECKPOINT_FORMAT_VERSION, CHECKPOINT_KEY
    from oct3d.models import get_model

    checkpoint = _load_checkpoint_dict(path, trust_checkpoint)
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is not an oct3d checkpoint: expected a Lightning checkpoint from `lightning fit` with "
            f"'state_dict' and '{CHECKPOINT_KEY}' entries, found {keys}"
        )
    meta_dict = checkpoint[CHECKPOINT_KEY]
    if meta_dict.get("task") == "segmentation":
        raise CheckpointError(
            f"{path} is a segmentation checkpoint; label volumes with `oct3d segment` (tools/segment.py): "
            "`oct3d infer` and `oct3d export` take the checkpoints of video and image classifiers"
        )
    if int(meta_dict.get("format_version", 0)) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta_dict.get('format_version')} is newer than this oct3d")
    metadata = ModelMetadata.from_dict(meta_dict)
    model = get_model(metadata.backbone, num_classes=metadata.num_classes, **metadata.backbone_kwargs)
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    model.eval().to(torch_device)
    return Predictor(model, metadata, torch_device, "checkpoint", amp)


def _read_sidecar(sidecar: Path) -> Any:
    """The parsed JSON of an export's sidecar (``None`` when it cannot be read or parsed)."""
    try:
        with open(sidecar) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _is_export_sidecar(sidecar: Path) -> bool:
    info = _read_sidecar(sidecar)
    return isinstance(info, dict) and "oct3d" in info and info.get("format") in set(EXPORT_FORMATS.values())


def _load_export(path: Path, sidecar: Path, device: torch.device, amp: bool) -> Predictor:
    info = _read_sidecar(sidecar)
    if not isinstance(info, dict) or "oct3d" not in info or "format" not in info:
        raise CheckpointError(f"{sidecar} is not an oct3d export sidecar (needs 'format' and 'oct3d' entries)")
    metadata = ModelMetadata.from_dict(info["oct3d"])
    fmt = info["format"]
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise CheckpointError(f"{path}: running an ONNX model needs onnxruntime: pip install 'oct3d[onnx]'") \
                from error

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        run: Any = ort.InferenceSession(str(path), providers=providers)
    elif fmt == "torchscript":
        run = torch.jit.load(str(path), map_location=device).eval()
    elif fmt == "exported-program":
        run = torch.export.load(str(path)).module().to(device)
    else:
        raise CheckpointError(f"{sidecar}: unknown export format {fmt!r}")
    return Predictor(run, metadata, device, fmt, amp)


# --------------------------------------------------------------------------------------------- inputs
def find_inputs(paths: Iterable[str | os.PathLike], extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[Path]:
    """Files named in ``paths``, with folders searched recursively for files with ``extensions`` (sorted).

    A folder's hidden files (``.name``, such as macOS's ``._name.mp4`` AppleDouble files) are skipped, and
    a file reached twice (named twice, or named and inside a named folder) is kept once, first place.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    return [file for file, _ in inputs_by_argument(paths, extensions)[0]]


def inputs_by_argument(paths: Iterable[str | os.PathLike], extensions: Sequence[str] = VIDEO_EXTENSIONS,
                       ) -> tuple[list[tuple[Path, int]], list[int]]:
    """:func:`find_inputs`'s files, each with the position in ``paths`` of the argument it was found under,
    and the positions of the arguments under which nothing was found (empty folders)."""
    found: list[tuple[Path, int]] = []
    empty: list[int] = []
    seen: set[Path] = set()
    for position, entry in enumerate(paths):
        files = find_videos([entry], extensions)
        if not files:
            empty.append(position)
        for path in files:
            key = path.absolute()  # (not resolve(): distinct names linked to one blob, as in DVC or a hub cache, stay)
            if key not in seen:
                seen.add(key)
                found.append((path, position))
    return found, empty


@dataclass(frozen=True)
class Segment:
    """A time span of a video and the first frames of the clips sampled in it."""

    start: float
    end: float
    clip_starts: tuple[int, ...]


def plan_segments(num_frames: int, fps: float, clip_frames: int, sampling_rate: float, temporal_views: int,
                  window: float | None = None, hop: float | None = None,
                  frame_times: Sequence[float] | None = None) -> list[Segment]:
    """Where to sample clips: one segment (the whole video) or sliding windows of ``window`` s every ``hop`` s.

    In each segment, ``temporal_views`` clips of ``clip_frames`` frames every ``sampling_rate`` source
    frames (fractional for a checkpoint with a ``target_fps``, see :func:`datamodules.video.source_step`)
    are spread uniformly (one clip: centered), as in the Kinetics test protocol. ``frame_times`` (each
    frame's time in seconds, from a variable-rate stream's timestamps) puts the windows' bounds at
    the frames shown then; without it frame ``i`` is taken to be at ``i / fps``.
    """
    from datamodules.video import clip_span

    if num_frames < 1 or fps <= 0:
        raise ValueError(f"a video needs frames and a frame rate, got num_frames={num_frames}, fps={fps}")
    times = list(frame_times) if frame_times is not None and len(frame_times) == num_frames else None
    if times is not None:
        steps = sorted(b - a for a, b in itertools.pairwise(times))
        duration = times[-1] + (steps[len(steps) // 2] if steps else 1.0 / fps)
    else:
        duration = num_frames / fps
    span = clip_span(clip_frames, sampling_rate)
    if window is None:
        bounds = [(0.0, duration)]
    else:
        hop = window if hop is None else hop
        count = max(1, math.ceil(max(duration - window, 0.0) / hop - 1e-9) + 1)
        bounds = [(i * hop, min(i * hop + window, duration)) for i in range(count)]
    segments = []
    for start, end in bounds:
        if times is not None:
            # The frames shown in [start, end): from the first at or after start to the last before end.
            first = min(bisect.bisect_left(times, start - 1e-6), num_frames - 1)
            last = max(min(bisect.bisect_left(times, end - 1e-6), num_frames) - 1, first)
        else:
            first = round(start * fps)
            last = max(min(round(end * fps), num_frames) - 1, first)
        room = max(last - first + 1 - span, 0)
        if temporal_views == 1:
            starts = (first + room // 2,)
        else:
            starts = tuple(first + round(room * i / (temporal_views - 1)) for i in range(temporal_views))
        segments.append(Segment(round(start, 3), round(end, 3), starts))
    return segments


@dataclass
class _Work:
    """The preprocessed views of one file, or of a part of a long video's segments, waiting for the model."""

    index: int
    path: Path
    views: Tensor | None = None  # (n_segments * views, ...) inputs
    segments: list[Segment] = field(default_factory=list)
    views_per_segment: int = 1
    error: str | None = None
    part: int = 0  # windowed videos come in parts of a few segments each (bounded memory)
    parts: int = 1


def _video_transform(meta: ModelMetadata, views: Views) -> tuple[Any, int, int, int, int]:
    from datamodules.transforms import VideoEvalTransform

    prep = meta.preprocessing
    num_frames = int(prep.get("num_frames", 8))
    rate = int(prep.get("sampling_rate", 8))
    crop = int(prep.get("crop_size", 224))
    temporal, crops = view_layout(views)
    kwargs = {k: prep[k] for k in ("mean", "std") if k in prep}
    transform = VideoEvalTransform(num_frames, crop, max(int(prep.get("short_side", crop)), crop), crops, **kwargs)
    return transform, num_frames, rate, temporal, crops


def _plan_video(path: Path, meta: ModelMetadata, views: Views, window: float | None, hop: float | None,
                decoder: str) -> list[Segment]:
    """The segments of a video (read from its header)."""
    from datamodules.video import open_video

    _, num_frames, rate, temporal, _ = _video_transform(meta, views)
    with open_video(path, decoder) as reader:
        info = reader.info
        step = _source_step(meta, rate, info.fps)
        return plan_segments(info.num_frames, info.fps, num_frames, step, temporal, window, hop,
                             reader.frame_times() if window is not None else None)


def _source_step(meta: ModelMetadata, rate: int, fps: float) -> float:
    """The distance between clip frames in this video's frames, as the checkpoint's data module sampled them."""
    from datamodules.video import check_target_fps, source_step

    return source_step(rate, fps, check_target_fps(meta.preprocessing.get("target_fps")))


def _load_video_views(path: Path, meta: ModelMetadata, views: Views, window: float | None, hop: float | None,
                      decoder: str, segments: list[Segment] | None = None) -> tuple[Tensor, list[Segment], int]:
    """The views of ``segments`` of a video (default: all of them, planned from ``window`` and ``hop``)."""
    from datamodules.video import clip_indices, open_video

    transform, num_frames, rate, temporal, crops = _video_transform(meta, views)
    clips: list[Tensor] = []
    with open_video(path, decoder) as reader:
        info = reader.info
        step = _source_step(meta, rate, info.fps)
        if segments is None:
            segments = plan_segments(info.num_frames, info.fps, num_frames, step, temporal, window, hop,
                                     reader.frame_times() if window is not None else None)
        for segment in segments:
            indices = [clip_indices(info.num_frames, s, num_frames, step) for s in segment.clip_starts]
            frames = reader.get_frames([i for clip in indices for i in clip])
            for c in range(len(indices)):
                clips.extend(transform.crops(frames[c * num_frames:(c + 1) * num_frames], list(range(crops))))
    return torch.stack(clips), segments, temporal * crops


def _load_image_view(path: Path, meta: ModelMetadata) -> Tensor:
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as F

    prep = meta.preprocessing
    crop = int(prep.get("crop_size", 224))
    # Decoded as ImageFolder decodes the training images (PIL, RGB), so every format it trains on is read.
    try:
        with Image.open(path) as opened:
            image = F.pil_to_tensor(opened.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError("not an image file PIL can read") from None
    except OSError as error:  # a truncated or corrupt file
        raise ValueError(f"unreadable image ({error})") from None
    image = F.resize(image, int(prep.get("resize_size", round(crop * 256 / 224))), antialias=True)
    image = F.center_crop(image, [crop, crop])
    image = F.to_dtype(image, torch.float32, scale=True)
    return F.normalize(image, prep.get("mean", [0.485, 0.456, 0.406]), prep.get("std", [0.229, 0.224, 0.225]))[None]


def _prepare(index: int, path: Path, meta: ModelMetadata, views: Views, window: float | None, hop: float | None,
             decoder: str, segments: list[Segment] | None = None, part: int = 0, parts: int = 1) -> _Work:
    work = _Work(index, path, part=part, parts=parts)
    try:
        if meta.task == "video":
            work.views, work.segments, work.views_per_segment = _load_video_views(
                path, meta, views, window, hop, decoder, segments)
        else:
            work.views = _load_image_view(path, meta)
            work.segments = [Segment(0.0, 0.0, (0,))]
    except Exception as error:  # any unreadable input becomes an error line; the run goes on
        work.error = _error_line(path, error)
    return work


def _error_line(path: Path, error: BaseException) -> str:
    message = str(error) or type(error).__name__
    return message if str(path) in message else f"{path}: {message}"


def _tasks(files: Sequence[Path], meta: ModelMetadata, views: Views, window: float | None, hop: float | None,
           decoder: str, batch_size: int) -> Iterator[tuple]:
    """``_prepare``'s arguments per file; a windowed video is split into parts of about ``batch_size`` views,
    so that a long video never holds all of its views in memory (its header is read here to plan them)."""
    per_segment = math.prod(view_layout(views))
    for index, path in enumerate(files):
        if window is None or meta.task != "video":
            yield index, path, meta, views, window, hop, decoder
            continue
        try:
            segments = _plan_video(path, meta, views, window, hop, decoder)
        except Exception:  # an unreadable header: the error line comes out of _prepare, in file order
            yield index, path, meta, views, window, hop, decoder
            continue
        step = max(1, batch_size // per_segment)
        chunks = [segments[i:i + step] for i in range(0, len(segments), step)]
        for part, chunk in enumerate(chunks):
            yield index, path, meta, views, window, hop, decoder, chunk, part, len(chunks)


def _topk(meta: ModelMetadata, probs: Tensor, k: int) -> list[dict[str, Any]]:
    scores, indices = probs.topk(min(k, probs.numel()))
    # A diverged model's NaN would be written as a bare NaN, which is not JSON: null instead.
    return [{"label": meta.label(int(i)), "score": round(float(s), 6) if math.isfinite(float(s)) else None}
            for s, i in zip(scores, indices)]


def _result(work: _Work, probs: Tensor, meta: ModelMetadata, k: int, windowed: bool) -> dict[str, Any]:
    per_segment = probs.view(len(work.segments), work.views_per_segment, -1).mean(1)
    result: dict[str, Any] = {"path": str(work.path), "topk": _topk(meta, per_segment.mean(0), k)}
    if windowed:
        result["segments"] = [
            {"start": s.start, "end": s.end, "topk": _topk(meta, p, k)} for s, p in zip(work.segments, per_segment)
        ]
    return result


def predict_files(predictor: Predictor, files: Sequence[Path], topk: int = 5, views: Views = 1,
                  window: float | None = None, hop: float | None = None, batch_size: int = 8,
                  decoder: str = "pyav", workers: int = 2, progress: bool = False) -> Iterator[dict[str, Any]]:
    """Predict every file in order; yields one result dict per file (``topk`` or ``error``).

    Files are decoded by ``workers`` threads ahead of the model; the views of successive files are
    batched together up to ``batch_size`` inputs per forward pass.
    """
    view_layout(views)  # checked before any file is read
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if window is not None and window <= 0:
        raise ValueError(f"window must be > 0 seconds, got {window}")
    if hop is not None and (window is None or hop <= 0):
        raise ValueError("hop needs a window and must be > 0 seconds")
    meta = predictor.metadata
    pending: list[_Work] = []  # decoded, in file order, awaiting (part of) a forward pass
    outputs: dict[int, list[Tensor]] = {}  # id(work) -> softmax rows so far
    done_parts: list[_Work] = []  # finished parts of the file being assembled (windowed videos)
    done_probs: list[Tensor] = []
    bar = _Progress(len(files), progress)

    def finished(work: _Work) -> bool:
        return work.error is not None or len(outputs.get(id(work), [])) == len(work.views)

    def flush(force: bool) -> Iterator[dict[str, Any]]:
        # Run the model whenever a full batch is queued (or at the end), then emit finished files in order.
        queued = [(w, i) for w in pending if w.views is not None for i in range(len(w.views))
                  if len(outputs.get(id(w), [])) <= i]
        while queued and (force or len(queued) >= batch_size):
            chunk, queued = queued[:batch_size], queued[batch_size:]
            logits = predictor(torch.stack([w.views[i] for w, i in chunk]))
            for (w, _), row in zip(chunk, logits.float().softmax(-1)):
                outputs.setdefault(id(w), []).append(row)
        while pending and finished(pending[0]):
            work = pending.pop(0)
            rows = outputs.pop(id(work), [])
            work.views = None  # the inputs are no longer needed; only the probabilities are kept
            done_parts.append(work)
            done_probs.extend(rows)
            if work.part < work.parts - 1:
                continue
            failed = next((w.error for w in done_parts if w.error), None)
            if failed is not None:
                yield {"path": str(work.path), "error": failed}
            else:
                whole = _Work(work.index, work.path, segments=[s for w in done_parts for s in w.segments],
                              views_per_segment=work.views_per_segment)
                yield _result(whole, torch.stack(done_probs), meta, topk, window is not None)
            done_parts.clear()
            done_probs.clear()
            bar.advance()

    tasks = _tasks(files, meta, views, window, hop, decoder, batch_size)
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool, bar:
        futures: list[Future] = []
        exhausted = False
        while not exhausted or futures:
            # Keep a bounded number of files (or parts of long videos) decoding ahead of the model.
            while not exhausted and len(futures) < 2 * max(workers, 1):
                task = next(tasks, None)
                if task is None:
                    exhausted = True
                else:
                    futures.append(pool.submit(_prepare, *task))
            if futures:
                pending.append(futures.pop(0).result())
                yield from flush(force=False)
        yield from flush(force=True)


class _Progress:
    """A rich progress bar on stderr for long runs (no-op otherwise)."""

    def __init__(self, total: int, enabled: bool):
        self._bar = None
        if enabled and total > 1:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task("inference", total=total)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)


def _print_table(results: list[dict[str, Any]], topk: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="oct3d predictions")
    table.add_column("file", overflow="fold")
    table.add_column("span (s)")
    table.add_column("top-1")
    table.add_column("score", justify="right")
    # The last column lists the runners-up, and says why a file failed (also at --topk 1).
    last_column = topk > 1 or any("error" in r for r in results)
    if last_column:
        table.add_column("error" if topk == 1 else "top-2" if topk == 2 else f"top-2..{topk}")
    # File names alone, unless two files share one: then their paths below the common folder.
    paths = [Path(r["path"]) for r in results]
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        try:
            common = Path(os.path.commonpath([str(p.parent) for p in paths]))
        except ValueError:  # absolute and relative paths mixed
            common = None
        names = [str(p.relative_to(common)) if common is not None and p.is_relative_to(common) else str(p)
                 for p in paths]
    for result, name in zip(results, names):
        if "error" in result:
            table.add_row(name, "", "[red]error[/red]", "", result["error"])
            continue
        segments = result.get("segments", [])
        rows = [("all", result["topk"])] + [(f"{s['start']:g}-{s['end']:g}", s["topk"]) for s in segments]
        for span, predictions in rows:
            best = predictions[0]
            rest = ", ".join(f"{p['label']} {_score_text(p['score'])}" for p in predictions[1:])
            table.add_row(name, span, best["label"], _score_text(best["score"]), *([rest] if last_column else []))
    Console(width=max(Console().width, 120)).print(table)


def _score_text(score: float | None) -> str:
    return "nan" if score is None else f"{score:.3f}"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``tools/infer.py`` / ``oct3d infer``."""
    parser = argparse.ArgumentParser(
        prog="oct3d infer", description="Classify video files (or images, for 2D models) with an oct3d model."
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="video files, or folders searched recursively")
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt from `lightning fit`, or an export")
    parser.add_argument("--output", help="write JSON lines to this file ('-': to stdout) instead of printing a table; "
                                         "a .csv file gets CSV rows")
    parser.add_argument("--format", choices=("jsonl", "csv"),
                        help="of --output (default: csv for a .csv file, else JSON lines)")
    parser.add_argument("--topk", type=int, default=5, help="predictions per file (default 5)")
    parser.add_argument("--views", type=int, choices=sorted(VIEW_LAYOUTS),
                        help="views per video (segment): 1 center clip (default), 30 = 10 clips x 3 crops")
    parser.add_argument("--clips", type=int, help="instead of --views: this many clips per video (segment)")
    parser.add_argument("--crops", type=int, choices=(1, 3), help="with --clips: crops per clip (default 1)")
    parser.add_argument("--test-views", action="store_true",
                        help="instead of --views: the checkpoint's test protocol (its data module's test_clips x "
                             "test_crops), which scores a video as `lightning test` did")
    parser.add_argument("--window", type=float, help="predict per segment of this many seconds")
    parser.add_argument("--hop", type=float, help="seconds between segment starts (default: --window)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--batch-size", type=int, default=8, help="views per forward pass (default 8)")
    parser.add_argument("--decoder", default="pyav", choices=[*DECODERS, "auto"],
                        help="video decoder (torchcodec needs the system FFmpeg libraries)")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads (default 2)")
    parser.add_argument("--no-amp", action="store_true", help="disable float16 autocast on CUDA")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow full unpickling of a checkpoint that weights_only loading refuses")
    return parser


def split_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``(existing, missing)`` input paths of a file-processing command. Usage errors
    (``parser.error``, before any work): an ``--output`` file whose folder does not exist, that is a
    folder, or that is one of the inputs or the checkpoint (it would be overwritten).

    A missing input is a data error like an unreadable file: the commands report it in their output
    as ``{"path", "error": "does not exist"}`` and go on with the others.
    """
    output = getattr(args, "output", None)
    if output and output != "-":
        check_output_file(parser, "--output", output, [*args.paths, getattr(args, "checkpoint", None)])
    missing = [p for p in args.paths if not Path(p).exists()]
    return [p for p in args.paths if p not in missing], missing


def check_output_file(parser: argparse.ArgumentParser, option: str, output: str | os.PathLike,
                      protected: Iterable[str | os.PathLike | None] = ()) -> None:
    """``parser.error`` unless ``output`` can be written as a new or replaced file: its folder exists, it
    is not a folder, and it is none of the ``protected`` files (a command's inputs and checkpoint)."""
    path = Path(output)
    if path.is_dir():
        parser.error(f"{option} {output} is a folder; give a file name")
    if not path.resolve().parent.is_dir():
        parser.error(f"{option} {output}: folder {path.resolve().parent} does not exist")
    if path.exists():
        for other in protected:
            if other is not None and Path(other).is_file() and os.path.samefile(path, other):
                parser.error(f"{option} {output} is also an input of this command ({other}); it would be "
                             "overwritten: choose another file")


def _is_utf8(encoding: str | None) -> bool:
    try:
        return codecs.lookup(encoding or "ascii").name == "utf-8"
    except LookupError:
        return False


def json_line(result: dict[str, Any], ascii_only: bool = False) -> str:
    """One JSON line of a result: paths as written (non-ASCII names readable, grep-able), escaped where
    asked (a terminal that is not UTF-8) or where a name is not valid UTF-8 (bytes that Python holds as
    surrogates, which no UTF-8 file can store)."""
    line = json.dumps(result, ensure_ascii=ascii_only)
    if not ascii_only:
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            line = json.dumps(result, ensure_ascii=True)
    return line + "\n"


#: The columns of ``oct3d infer``'s CSV output: one row per prediction (per segment with ``--window``).
CSV_COLUMNS = ("path", "segment_start", "segment_end", "rank", "label", "score", "error")


def csv_writer(handle: Any) -> Callable[[dict[str, Any]], None]:
    """A function writing each result as CSV rows (:data:`CSV_COLUMNS`, header first): one row per top-k
    prediction, ranked from 1, per segment with windows; a failed file is one row with its error."""
    import csv

    writer = csv.writer(handle)
    writer.writerow(CSV_COLUMNS)

    def write(result: dict[str, Any]) -> None:
        if "error" in result:
            writer.writerow([result["path"], "", "", "", "", "", result["error"]])
            return
        parts = result.get("segments") or [{"start": "", "end": "", "topk": result["topk"]}]
        for part in parts:
            for rank, entry in enumerate(part["topk"], start=1):
                score = "" if entry["score"] is None else f"{entry['score']:.6g}"
                writer.writerow([result["path"], part["start"], part["end"], rank, entry["label"], score, ""])

    return write


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
    for name in ("topk", "batch_size", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.window is not None and not (math.isfinite(args.window) and args.window > 0):
        parser.error(f"--window must be a finite number of seconds > 0 (omit it for one prediction per video), "
                     f"got {args.window}")
    if args.hop is not None and (args.window is None or not (math.isfinite(args.hop) and args.hop > 0)):
        parser.error(f"--hop needs --window and must be a finite number of seconds > 0, got {args.hop}")
    chosen = [name for name, given in (("--views", args.views is not None), ("--clips", args.clips is not None),
                                        ("--test-views", args.test_views)) if given]
    if len(chosen) > 1:
        parser.error(f"{' and '.join(chosen)} choose the views in different ways: give one of them")
    if args.format is not None and not args.output:
        parser.error("--format sets the format of --output: give --output FILE (or - for stdout)")
    if args.crops is not None and args.clips is None:
        parser.error("--crops goes with --clips (e.g. --clips 10 --crops 3); --views 3 is one clip x 3 crops")
    if args.clips is not None and args.clips < 1:
        parser.error(f"--clips must be >= 1, got {args.clips}")
    views: Views = args.views or 1
    if args.clips is not None:
        views = (args.clips, args.crops or 1)
    present, missing = split_inputs(parser, args)
    try:
        args.decoder = require_decoder(args.decoder)  # a decoder that cannot load here is a usage error
        predictor = load_predictor(args.checkpoint, args.device, args.trust_checkpoint, amp=not args.no_amp)
        if args.test_views:
            prep = predictor.metadata.preprocessing
            if "test_clips" not in prep or "test_crops" not in prep:
                raise CheckpointError(f"--test-views: {args.checkpoint} records no test protocol (a checkpoint "
                                      "written before oct3d stored it, or not a video model); pass --views or --clips")
            views = (int(prep["test_clips"]), int(prep["test_crops"]))
        if predictor.metadata.task != "video":
            video_only = [name for name, given in (
                ("--views", args.views is not None), ("--clips", args.clips is not None),
                ("--test-views", args.test_views), ("--window", args.window is not None)) if given]
            if video_only:  # an image takes one view; silently ignoring the option would mislead
                raise ValueError(f"{' and '.join(video_only)} choose{'s' if len(video_only) == 1 else ''} views of "
                                 f"videos, and {args.checkpoint} holds an image classifier (one view per image): "
                                 f"drop {'them' if len(video_only) > 1 else 'it'}")
        extensions = VIDEO_EXTENSIONS if predictor.metadata.task == "video" else IMAGE_EXTENSIONS
        # The argument each file came from, so that missing paths are reported in argument order.
        found, empty = inputs_by_argument(present, extensions)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    positions: dict[str, int] = {}
    for i, path in enumerate(args.paths):
        positions.setdefault(path, i)
    origins = [positions[present[i]] for _, i in found]
    files = [file for file, _ in found]
    for folder in dict.fromkeys(present[i] for i in empty):
        print(f"warning: folder {folder} holds no {'/'.join(extensions)} files", file=sys.stderr)
    if not files and not missing:
        print(f"error: no {'/'.join(extensions)} files under {' '.join(args.paths)}", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    output_format = args.format or ("csv" if (args.output or "").lower().endswith(".csv") else "jsonl")
    if args.output == "-":
        handle = sys.stdout
    else:
        # A CSV cell cannot escape a file name that is not UTF-8 as JSON does: backslashes stand in for its bytes.
        handle = open(args.output, "w", encoding="utf-8", newline="" if output_format == "csv" else None,  # noqa: SIM115 - closed below, written line by line
                      errors="backslashreplace" if output_format == "csv" else "strict") if args.output else None
    missing_at = [(position, path) for position, path in enumerate(args.paths) if path in missing]
    ascii_only = handle is sys.stdout and not _is_utf8(getattr(sys.stdout, "encoding", None))
    write = None
    if handle is not None:
        write = csv_writer(handle) if output_format == "csv" else (lambda r: handle.write(json_line(r, ascii_only)))

    def report_missing(before: int) -> None:
        while missing_at and missing_at[0][0] < before:
            results.append({"path": missing_at.pop(0)[1], "error": "does not exist"})
            if write is not None:
                write(results[-1])

    try:
        for origin, result in zip(origins, predict_files(
                predictor, files, args.topk, views, args.window, args.hop, args.batch_size, args.decoder,
                args.workers, progress=sys.stderr.isatty()) if files else ()):
            report_missing(origin)
            results.append(result)
            if write is not None:
                write(result)
                handle.flush()
        report_missing(len(args.paths))
    finally:
        if handle is not None and handle is not sys.stdout:
            handle.close()
    if handle is None:
        _print_table(results, args.topk)
    failed = sum("error" in r for r in results)
    if failed:
        print(f"{failed} of {len(results)} files failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
