"""Kinetics-layout video classification data: annotations, a map-style dataset, a LightningDataModule.

Two on-disk formats are read (detected automatically):

* the official Kinetics layout: ``root/annotations/{train,val,test}.csv`` with columns
  ``label,youtube_id,time_start,time_end,split`` (extra columns ignored; ``validate.csv`` is accepted
  for ``val``), videos ``<youtube_id>_<time_start:06d>_<time_end:06d>.mp4`` in label folders
  ``root/<split>/<label>/`` (label with spaces or with underscores) or flat in ``root/<split>/``;
* pytorchvideo's list format: ``root/{train,val,test}.csv`` or ``.txt``, one ``path label`` per line
  (path relative to ``root`` or absolute, integer label); class names from ``root/classes.txt``
  (one per line) when present, else the label numbers.

Training can draw several clips from one read of a video (``clips_per_video``), each with its own
temporal position and augmentation, as PySlowFast's repeated sampling does: decoding, not the network,
is what limits video training, and a second clip of an already decoded stretch of video is almost free.

Unreadable videos (missing, truncated, corrupt, not a video) never stop a run: the sample is replaced
by another readable video of the same split, chosen deterministically, and the failure travels in the
batch (``batch["failed"]``) so that :class:`datamodules.DataErrorReport` can report it once per epoch.
"""

from __future__ import annotations

import csv
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .base import SplitDataModule
from .decoders import require_decoder
from .reporting import replacement_indices
from .transforms import KINETICS_MEAN, KINETICS_STD, VideoEvalTransform, VideoTrainTransform
from .video import (
    VIDEO_EXTENSIONS,
    VideoDecodeError,
    check_target_fps,
    clip_indices,
    clip_span,
    open_video,
    source_step,
)

__all__ = [
    "KineticsDataModule",
    "VideoClipDataset",
    "VideoSample",
    "collate_multi_clip",
    "find_annotation_format",
    "read_kinetics_annotations",
    "read_labeled_paths",
]

SPLITS = ("train", "val", "test")
MODES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "validate", "validation"), "test": ("test",)}
_REQUIRED_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


@dataclass(frozen=True)
class VideoSample:
    """One labelled video of a split.

    Attributes:
        path: the video file (may not exist: a missing video is reported when it is read).
        label: class index (-1 when the split has no labels, e.g. an unlabelled Kinetics test set).
    """

    path: str
    label: int


def _find_file(directory: Path, split: str, suffixes: tuple[str, ...]) -> Path | None:
    for name in _SPLIT_ALIASES[split]:
        for suffix in suffixes:
            candidate = directory / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def find_annotation_format(root: str | os.PathLike) -> str:
    """Which format ``root`` holds: ``"kinetics"`` (annotations/*.csv) or ``"list"`` (path-label lists).

    Raises:
        FileNotFoundError: neither a ``root/annotations/train.csv`` nor a ``root/train.{csv,txt}`` exists.
    """
    root = Path(root)
    if _find_file(root / "annotations", "train", (".csv",)) is not None:
        return "kinetics"
    if _find_file(root, "train", (".csv", ".txt")) is not None:
        return "list"
    raise FileNotFoundError(
        f"no annotations under {root}: expected the Kinetics layout (root/annotations/train.csv with columns "
        f"label,youtube_id,time_start,time_end,split) or a path-label list (root/train.csv or root/train.txt); "
        f"`python tools/make_synthetic_kinetics.py {root}` writes a small synthetic set there"
    )


def _read_kinetics_rows(csv_path: Path, require_label: bool) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in (reader.fieldnames or [])]
        required = _REQUIRED_COLUMNS if require_label else _REQUIRED_COLUMNS[1:]
        missing = [name for name in required if name not in columns]
        if missing:
            raise ValueError(
                f"{csv_path}: missing column(s) {', '.join(missing)}; expected a header with "
                f"label,youtube_id,time_start,time_end,split (found: {','.join(columns) or 'nothing'})"
            )
        reader.fieldnames = columns
        return [row for row in reader if row.get("youtube_id")]


def _kinetics_class_names(root: Path) -> list[str]:
    train_csv = _find_file(root / "annotations", "train", (".csv",))
    if train_csv is None:
        raise FileNotFoundError(f"{root / 'annotations' / 'train.csv'} not found")
    labels = {row["label"].strip() for row in _read_kinetics_rows(train_csv, require_label=True)}
    if not labels:
        raise ValueError(f"{train_csv}: no rows, so no classes")
    return sorted(labels)


def _index_videos(split_dir: Path) -> dict[str, str]:
    """Map video file stem -> path for the videos in ``split_dir`` and its label folders (one directory scan)."""
    index: dict[str, str] = {}
    if not split_dir.is_dir():
        return index
    for entry in os.scandir(split_dir):
        if entry.is_dir():
            for child in os.scandir(entry.path):
                stem, suffix = os.path.splitext(child.name)
                if suffix.lower() in VIDEO_EXTENSIONS:
                    index.setdefault(f"{entry.name}/{stem}", child.path)
                    index.setdefault(stem, child.path)
        else:
            stem, suffix = os.path.splitext(entry.name)
            if suffix.lower() in VIDEO_EXTENSIONS:
                index.setdefault(stem, entry.path)
    return index


def read_kinetics_annotations(
    root: str | os.PathLike, split: str, class_names: list[str] | None = None
) -> list[VideoSample]:
    """Read one split of the official Kinetics layout.

    Args:
        root: dataset root.
        split: ``"train"``, ``"val"`` or ``"test"``.
        class_names: the label vocabulary (default: sorted unique labels of the train split).

    Returns:
        one :class:`VideoSample` per annotation row. A video absent on disk keeps its expected path
        (``root/<split>/<label>/<name>.mp4``), so reading it reports it as missing.

    Raises:
        FileNotFoundError: no annotation file for ``split``.
        ValueError: missing columns or bad times.

    Rows whose label is not among ``class_names`` are skipped with one warning that counts them.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    csv_path = _find_file(root / "annotations", split, (".csv",))
    if csv_path is None:
        raise FileNotFoundError(f"{root / 'annotations' / f'{split}.csv'} not found")
    if class_names is None:
        class_names = _kinetics_class_names(root)
    class_index = {name: i for i, name in enumerate(class_names)}
    # Unlabelled test sets (Kinetics-700-2020) have no label column; their samples get label -1.
    rows = _read_kinetics_rows(csv_path, require_label=split != "test")
    split_dir = next((root / name for name in _SPLIT_ALIASES[split] if (root / name).is_dir()), root / split)
    index = _index_videos(split_dir)
    samples = []
    unknown: list[str] = []
    for row in rows:
        label_name = (row.get("label") or "").strip()
        try:
            name = f"{row['youtube_id'].strip()}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
        except ValueError as error:
            raise ValueError(f"{csv_path}: bad time_start/time_end in row {row}") from error
        if label_name:
            if label_name not in class_index:
                unknown.append(label_name)
                continue
            label = class_index[label_name]
        else:
            label = -1
        path = (
            index.get(f"{label_name}/{name}")
            or index.get(f"{label_name.replace(' ', '_')}/{name}")
            or index.get(name)
            or str(split_dir / label_name / f"{name}.mp4")
        )
        samples.append(VideoSample(path, label))
    _warn_unknown_labels(csv_path, unknown, f"among the {len(class_names)} train classes")
    return samples


def _warn_unknown_labels(path: Path, labels: list, expected: str) -> None:
    # An evaluation split that lists a class the model never trained on (a partial download, a
    # hand-made subset) cannot be scored against it; its rows are skipped and counted, not fatal.
    if not labels:
        return
    counts = Counter(labels)  # in order of first appearance
    named = ", ".join(f"{label!r} ({count})" for label, count in list(counts.items())[:5])
    more = f", and {len(counts) - 5} more" if len(counts) > 5 else ""
    warnings.warn(
        f"{path}: skipped {len(labels)} row(s) whose label is not {expected}: {named}{more}", stacklevel=3
    )


def _list_file(root: Path, split: str) -> Path:
    path = _find_file(root, split, (".csv", ".txt"))
    if path is None:
        raise FileNotFoundError(f"no list file for split {split!r} under {root} (expected {split}.csv or {split}.txt)")
    return path


def _read_list_rows(list_path: Path) -> list[tuple[str, int]]:
    rows = []
    with open(list_path, encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)  # the path may contain spaces, the label does not
            if len(parts) != 2:
                raise ValueError(f"{list_path}:{line_number}: expected 'path label', got {line!r}")
            try:
                label = int(parts[1])
            except ValueError as error:
                raise ValueError(f"{list_path}:{line_number}: label must be an integer, got {parts[1]!r}") from error
            if label < 0:
                raise ValueError(f"{list_path}:{line_number}: label must be >= 0, got {label}")
            rows.append((parts[0], label))
    return rows


def _list_class_names(root: Path) -> list[str]:
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        names = [line.strip() for line in classes_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if names:
            return names
    rows = _read_list_rows(_list_file(root, "train"))
    if not rows:
        raise ValueError(f"{_list_file(root, 'train')}: no rows, so no classes")
    return [str(i) for i in range(max(label for _, label in rows) + 1)]


def read_labeled_paths(root: str | os.PathLike, split: str, num_classes: int | None = None) -> list[VideoSample]:
    """Read one split of the ``path label`` list format (pytorchvideo's LabeledVideoDataset style).

    Relative paths are resolved against ``root``. Labels must be in [0, num_classes) when it is given:
    the train split raises on one past that range (the classes are wrong), other splits skip such
    rows with one warning that counts them.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    list_path = _list_file(root, split)
    samples = []
    unknown: list[int] = []
    for path, label in _read_list_rows(list_path):
        if num_classes is not None and label >= num_classes:
            if split == "train":  # the train split defines the classes: a label past them is a wrong classes.txt
                raise ValueError(f"{list_path}: label {label} out of range for {num_classes} classes")
            unknown.append(label)
            continue
        resolved = path if os.path.isabs(path) else str(root / path)
        samples.append(VideoSample(resolved, label))
    _warn_unknown_labels(list_path, unknown, f"in [0, {num_classes})")
    return samples


class VideoClipDataset(Dataset):
    """Map-style dataset of video clips, robust to unreadable videos.

    Modes:
        * ``"train"``: one item per video, a random clip, ``transform(frames)``;
        * ``"val"``: one item per video, the center clip, ``transform(frames)``;
        * ``"test"``: ``num_clips * num_crops`` items per video (uniformly spaced clips x spatial crops),
          ``transform(frames, crop_index)``.

    Each item is a dict ``{"video": (C, T, H, W) float, "label": int, "video_index": int, "failed": str}``
    (in test mode also ``"view_index"``, the item's index);
    ``failed`` is ``""`` or ``"path: reason"`` of the unreadable video that this item replaced. With
    ``clips_per_video=K > 1`` (train mode) ``video`` is (K, C, T, H, W): K clips of one decode, each at its
    own random start and with its own augmentation; :func:`collate_multi_clip` flattens them into a batch.

    A transform with ``sample(height, width)`` and ``apply(frames, choice)`` (as
    :class:`~datamodules.transforms.VideoTrainTransform`) has its random choices drawn before decoding,
    so that ``decode_time_resize`` can scale each clip while it is decoded; any other callable is called
    on the decoded frames.

    Args:
        samples: the videos of the split.
        mode: ``"train"``, ``"val"`` or ``"test"``.
        transform: frames (T, H, W, 3) uint8 -> clip; in test mode it also takes a crop index.
        num_frames: frames per clip.
        sampling_rate: distance between clip frames, in source frames (in frames at ``target_fps`` when
            that is set).
        num_clips: temporal views per video (test mode).
        num_crops: spatial views per clip (test mode).
        decoder: ``"pyav"``, ``"decord"``, ``"torchcodec"`` or ``"auto"`` (see :mod:`datamodules.decoders`).
        max_retries: how many other videos to try before giving up on an item.
        seed: varies the deterministic choice of replacement videos in validation and test (training draws
            them from torch's generator, so they change between epochs).
        clips_per_video: training clips drawn from one decode of a video (train mode).
        decoder_threads: decoding threads per reader.
        decode_time_resize: resize clips while decoding (PyAV: libswscale) instead of in the transform.
        target_fps: count ``sampling_rate`` in frames at this rate, so that clips span the same time in
            videos of any frame rate (see :func:`~datamodules.video.source_step`); ``None``: in source frames.

    Attributes:
        timing: seconds spent decoding (open, decode, RGB conversion) and transforming, the clips
            delivered, the video opens (``videos``) and the frames decoded, in this process since
            construction (read by ``tools/benchmark_data.py``).
    """

    def __init__(
        self,
        samples: list[VideoSample],
        mode: str,
        transform: Callable,
        num_frames: int,
        sampling_rate: int,
        num_clips: int = 1,
        num_crops: int = 1,
        decoder: str = "pyav",
        max_retries: int = 50,
        seed: int = 0,
        clips_per_video: int = 1,
        decoder_threads: int = 1,
        decode_time_resize: bool = False,
        target_fps: float | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        decoder = require_decoder(decoder)
        if not samples:
            raise ValueError("samples is empty: the split lists no video")
        checked = (
            ("num_frames", num_frames),
            ("sampling_rate", sampling_rate),
            ("max_retries", max_retries),
            ("clips_per_video", clips_per_video),
            ("decoder_threads", decoder_threads),
        )
        for name, value in checked:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if mode == "test" and (num_clips < 1 or num_crops < 1):
            raise ValueError(f"num_clips and num_crops must be >= 1, got {num_clips} and {num_crops}")
        self.samples = list(samples)
        self.mode = mode
        self.transform = transform
        self.num_frames = num_frames
        self.sampling_rate = sampling_rate
        self.views_per_video = num_clips * num_crops if mode == "test" else 1
        self.num_clips = num_clips if mode == "test" else 1
        self.num_crops = num_crops if mode == "test" else 1
        self.decoder = decoder
        self.max_retries = max_retries
        self.seed = seed
        self.clips_per_video = clips_per_video if mode == "train" else 1
        self.decoder_threads = decoder_threads
        self.decode_time_resize = decode_time_resize
        self.target_fps = check_target_fps(target_fps)
        self.timing: dict[str, float] = {"decode_s": 0.0, "transform_s": 0.0, "clips": 0, "videos": 0,
                                         "frames_decoded": 0}
        # Failures seen by this process (each DataLoader worker has its own copy; batches carry them out).
        self.failures: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.samples) * self.views_per_video

    def _step(self, fps: float) -> float:
        """Distance between clip frames in this video's frames (``sampling_rate`` without ``target_fps``)."""
        return source_step(self.sampling_rate, fps, self.target_fps)

    def _start_frame(self, num_video_frames: int, clip_index: int, step: float) -> int:
        slack = max(num_video_frames - clip_span(self.num_frames, step), 0)
        if self.mode == "train":
            return int(torch.randint(0, slack + 1, ()).item())
        if self.num_clips == 1:
            return slack // 2
        return round(clip_index * slack / (self.num_clips - 1))

    def _plan(self, num_video_frames: int, height: int, width: int, fps: float) -> tuple[list, list]:
        """Frame indices and (train mode) augmentation choices of the clips to draw from one video."""
        clips, choices = [], []
        sample = getattr(self.transform, "sample", None) if self.mode == "train" else None
        step = self._step(fps)
        for _ in range(self.clips_per_video):
            start = self._start_frame(num_video_frames, 0, step)
            clips.append(clip_indices(num_video_frames, start, self.num_frames, step))
            choices.append(sample(height, width) if sample is not None else None)
        return clips, choices

    def _sizes(self, choices: list, height: int, width: int) -> list | None:
        if not self.decode_time_resize:
            return None
        if self.mode == "train":
            return [getattr(choice, "resized_size", None) for choice in choices]
        resized_size = getattr(self.transform, "resized_size", None)
        return [resized_size(height, width)] * len(choices) if resized_size is not None else None

    def _decode(
        self, video_index: int, plan: Callable[[Any], tuple[list, list | None, Any]],
    ) -> tuple[list, Any, float]:
        """Decode the clips ``plan(info)`` returns (frame indices per clip, decode-time sizes or None, and
        anything the caller needs back) from one open of a video; remembers an unreadable video.
        Returns the decoded clips, that last item and the start time."""
        path = self.samples[video_index].path
        if path in self.failures:
            raise VideoDecodeError(path, self.failures[path])
        started = time.perf_counter()
        try:
            with open_video(path, self.decoder, self.decoder_threads, self.decode_time_resize) as reader:
                clips, sizes, planned = plan(reader.info)
                decoded = reader.get_clips(clips, sizes)
                # (PyAV's reader counts the frames it decoded; the others decode what they are asked)
                self.timing["frames_decoded"] += getattr(reader, "frames_decoded", sum(len(c) for c in clips))
                return decoded, planned, started
        except VideoDecodeError as error:
            self.failures[path] = error.reason
            raise

    def _count(self, started: float, transforming: float, clips: int) -> None:
        done = time.perf_counter()
        self.timing["decode_s"] += transforming - started
        self.timing["transform_s"] += done - transforming
        self.timing["clips"] += clips
        self.timing["videos"] += 1

    def _load_clips(self, video_index: int) -> torch.Tensor:
        """Train and val mode: ``clips_per_video`` clips of one video (one, unstacked, by default)."""

        def plan(info: Any) -> tuple[list, list | None, list]:
            clips, choices = self._plan(info.num_frames, info.height, info.width, info.fps)
            return clips, self._sizes(choices, info.height, info.width), choices

        decoded, choices, started = self._decode(video_index, plan)
        transforming = time.perf_counter()
        if choices[0] is not None and self.clips_per_video > 1:
            # The clips are written straight into the item's tensor (no stack copy).
            size = self.transform.crop_size
            stacked = torch.empty((len(decoded), 3, self.transform.num_frames, size, size), dtype=torch.float32)
            videos = [self.transform.apply(f, c, out=slot) for f, c, slot in zip(decoded, choices, stacked)]
        elif choices[0] is not None:
            videos = [self.transform.apply(frames, choice) for frames, choice in zip(decoded, choices)]
        else:
            videos = [self.transform(frames) for frames in decoded]
        self._count(started, transforming, len(videos))
        if self.clips_per_video == 1:
            return videos[0]
        return stacked if choices[0] is not None else torch.stack(videos)

    def _load_views(self, video_index: int, views: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Test mode: the ``(clip_index, crop_index)`` views of one video from one decode, each clip
        decoded once and resized once for all of its crops."""
        clip_ids = sorted({clip for clip, _ in views})

        def plan(info: Any) -> tuple[list, list | None, None]:
            step = self._step(info.fps)
            clips = [
                clip_indices(info.num_frames, self._start_frame(info.num_frames, clip, step), self.num_frames, step)
                for clip in clip_ids
            ]
            return clips, self._sizes([None] * len(clips), info.height, info.width), None

        decoded, _, started = self._decode(video_index, plan)
        transforming = time.perf_counter()
        # One resize for all crops of a clip, unless a subclass changed what a crop is.
        crops = self.transform.crops if type(self.transform).__call__ is VideoEvalTransform.__call__ else None
        by_view: dict[tuple[int, int], torch.Tensor] = {}
        for clip, frames in zip(clip_ids, decoded):
            wanted = sorted({crop for c, crop in views if c == clip})
            made = crops(frames, wanted) if crops is not None else [self.transform(frames, k) for k in wanted]
            by_view.update(((clip, crop), video) for crop, video in zip(wanted, made))
        self._count(started, transforming, len(by_view))
        return [by_view[view] for view in views]

    def __getitem__(self, index: int) -> dict:
        return self._items([self._checked_index(index)])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """The items of one batch (the DataLoader's batched fetch). In test mode the views of one video
        in the batch come from one decode of it, instead of one decode per view."""
        return self._items([self._checked_index(index) for index in indices])

    def _checked_index(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        return int(index)

    def _items(self, indices: list[int]) -> list[dict]:
        if self.mode == "test":  # the views of each video, grouped
            groups: dict[int, list[tuple[int, int, int]]] = {}
            for position, index in enumerate(indices):
                video_index, view = divmod(index, self.views_per_video)
                groups.setdefault(video_index, []).append((position, *divmod(view, self.num_crops)))
            grouped = list(groups.items())
        else:  # every index its own draw: a sampler repeating an index still gets independent clips
            grouped = [(index, [(position, 0, 0)]) for position, index in enumerate(indices)]
        items: list[dict] = [{} for _ in indices]
        for video_index, entries in grouped:
            views = [(clip, crop) for _, clip, crop in entries]
            videos, label, failed = self._load_or_replace(video_index, views, indices[entries[0][0]])
            for (position, _, _), video in zip(entries, videos):
                # A replacement keeps the requested video_index so multi-view aggregation stays aligned.
                items[position] = {"video": video, "label": label, "video_index": video_index, "failed": failed}
                if self.mode == "test":
                    # Which of the video's views this is: under DDP the sampler pads with repeated items,
                    # which the per-view test metrics count once.
                    items[position]["view_index"] = indices[position]
        return items

    def _load_or_replace(
        self, video_index: int, views: list[tuple[int, int]], index: int,
    ) -> tuple[list[torch.Tensor], int, str]:
        """The views of ``video_index``, or of the first readable replacement: (videos, label, failure)."""
        try:
            return self._load_many(video_index, views), self.samples[video_index].label, ""
        except VideoDecodeError as error:
            failed = str(error)
        for replacement in self._replacements(video_index):
            try:
                videos = self._load_many(replacement, views)
            except VideoDecodeError:
                continue
            return videos, self.samples[replacement].label, failed
        tried = 1 + min(len(self.samples) - 1, self.max_retries)
        scope = "no readable video in this split" if tried == len(self.samples) else "none of them readable"
        raise RuntimeError(
            f"tried {tried} of {len(self.samples)} videos for item {index}, {scope}; first failure: {failed}"
        )

    def _load_many(self, video_index: int, views: list[tuple[int, int]]) -> list[torch.Tensor]:
        if self.mode == "test":
            return self._load_views(video_index, views)
        return [self._load_clips(video_index) for _ in views]

    def _replacements(self, video_index: int) -> Iterator[int]:
        """Videos to try in place of an unreadable one. In training the order is drawn from torch's
        generator (seeded per epoch and worker by Lightning), so an unreadable video gets other
        stand-ins in other epochs rather than giving one video extra weight every epoch; validation
        and test keep the fixed ``seed``, so their scores do not move between runs."""
        seed = self.seed
        if self.mode == "train":
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        return replacement_indices(video_index, len(self.samples), seed, self.max_retries)


def collate_multi_clip(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate items holding K clips each (``video`` (K, C, T, H, W)) into a batch of B x K clips.

    The clips of one video are consecutive; ``label``, ``video_index`` and ``failed`` are repeated per clip.
    """
    batch = default_collate(items)
    clips = batch["video"].shape[1]
    batch["video"] = batch["video"].flatten(0, 1)
    batch["label"] = batch["label"].repeat_interleave(clips)
    batch["video_index"] = batch["video_index"].repeat_interleave(clips)
    batch["failed"] = [entry for entry in batch["failed"] for _ in range(clips)]
    return batch


class KineticsDataModule(SplitDataModule):
    """LightningDataModule for Kinetics-layout video classification (see the module docstring for formats).

    Batches are dicts: ``video`` float (B, 3, T, H, W), ``label`` long (B,), ``video_index`` long (B,)
    (index of the video in its split, for multi-view aggregation), ``failed`` list[str] (per sample,
    ``""`` or ``"path: reason"`` of an unreadable video it replaced). Training batches hold
    ``B = batch_size x clips_per_video`` clips (see :attr:`clips_per_batch`), the clips of a video consecutive.

    Args:
        root: dataset root.
        num_frames: frames per clip.
        sampling_rate: distance between clip frames, in source frames, or with ``target_fps`` in frames at
            that rate.
        crop_size: spatial size of the clips.
        min_short_side: short side of evaluation frames and lower bound of the training scale jitter.
        max_short_side: upper bound of the training scale jitter.
        batch_size: videos per training batch (the batch holds ``batch_size x clips_per_video`` clips).
        num_workers: DataLoader worker processes.
        decoder: ``"pyav"`` (default), ``"decord"``, ``"torchcodec"`` (optional extra) or ``"auto"``
            (see :mod:`datamodules.decoders`).
        test_clips: temporal views per test video.
        test_crops: spatial views per test clip (1: center, 3: left/center/right).
        pin_memory: pin batches in page-locked memory (for GPU training).
        eval_batch_size: batch size of validation, test and predict loaders (default: ``batch_size``).
        mean: normalization mean.
        std: normalization standard deviation.
        max_retries: other videos tried when one is unreadable.
        seed: varies the deterministic choice of replacement videos in validation and test (training draws
            them from torch's generator, which Lightning seeds per epoch and worker).
        persistent_workers: keep workers alive between epochs.
        drop_last: drop the last incomplete training batch.
        flip_prob: probability of a horizontal flip in training (0 when classes depend on left/right,
            e.g. the synthetic "moving left"/"moving right").
        clips_per_video: training clips drawn from one decode of each video, each with its own random
            start and augmentation (1: one clip per video per epoch, as before; 2 roughly doubles the clips
            per second a worker delivers, see docs/video_data.md).
        decoder_threads: decoding threads per DataLoader worker (0: the cores of this process shared among
            the workers, at least 1).
        decode_time_resize: scale while decoding (PyAV: libswscale in the RGB conversion) instead of in the
            transform; off by default because torch's resize measured faster (docs/video_data.md).
        target_fps: the frame rate ``sampling_rate`` is counted at (PySlowFast's ``TARGET_FPS``; 30 for
            Kinetics), so that a clip spans ``(num_frames - 1) * sampling_rate / target_fps`` seconds in
            videos of any frame rate: a 60 fps video is sampled every 16 frames, a 25 fps one every
            6.67. ``None`` (default): ``sampling_rate`` source frames whatever the video's rate.
            Saved in checkpoints, so that ``oct3d infer`` samples clips the same way.
    """

    def __init__(
        self,
        root: str,
        num_frames: int = 8,
        sampling_rate: int = 8,
        crop_size: int = 224,
        min_short_side: int = 256,
        max_short_side: int = 320,
        batch_size: int = 8,
        num_workers: int = 4,
        decoder: str = "pyav",
        test_clips: int = 10,
        test_crops: int = 3,
        pin_memory: bool = True,
        eval_batch_size: int | None = None,
        mean: tuple[float, float, float] = KINETICS_MEAN,
        std: tuple[float, float, float] = KINETICS_STD,
        max_retries: int = 50,
        seed: int = 0,
        persistent_workers: bool = False,
        drop_last: bool = False,
        flip_prob: float = 0.5,
        clips_per_video: int = 1,
        decoder_threads: int = 1,
        decode_time_resize: bool = False,
        target_fps: float | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        require_decoder(decoder)
        if not isinstance(decoder_threads, int) or isinstance(decoder_threads, bool) or decoder_threads < 0:
            raise ValueError(f"decoder_threads must be an int >= 0 (0: automatic), got {decoder_threads!r}")
        positive = dict(
            num_frames=num_frames,
            sampling_rate=sampling_rate,
            crop_size=crop_size,
            min_short_side=min_short_side,
            max_short_side=max_short_side,
            batch_size=batch_size,
            test_clips=test_clips,
            test_crops=test_crops,
            max_retries=max_retries,
            clips_per_video=clips_per_video,
        )
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be a positive int or None, got {eval_batch_size!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if min_short_side < crop_size:
            raise ValueError(f"min_short_side ({min_short_side}) must be >= crop_size ({crop_size})")
        if max_short_side < min_short_side:
            raise ValueError(f"max_short_side ({max_short_side}) must be >= min_short_side ({min_short_side})")
        self.save_hyperparameters()
        self.root = Path(root)
        self.num_frames = num_frames
        self.sampling_rate = sampling_rate
        self.crop_size = crop_size
        self.min_short_side = min_short_side
        self.max_short_side = max_short_side
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.decoder = decoder
        self.test_clips = test_clips
        self.test_crops = test_crops
        self.pin_memory = pin_memory
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.max_retries = max_retries
        self.seed = seed
        self.persistent_workers = persistent_workers
        self.drop_last = drop_last
        self.flip_prob = flip_prob
        self.clips_per_video = clips_per_video
        self.decoder_threads = decoder_threads
        self.decode_time_resize = decode_time_resize
        self.target_fps = check_target_fps(target_fps)
        self._class_names: list[str] | None = None

    @property
    def clips_per_batch(self) -> int:
        """Clips in a training batch: ``batch_size x clips_per_video``."""
        return self.batch_size * self.clips_per_video

    def reader_threads(self) -> int:
        """Decoding threads of each reader: ``decoder_threads``, or for 0 the cores per DataLoader worker."""
        if self.decoder_threads > 0:
            return self.decoder_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // max(self.num_workers, 1))

    # Class names are needed before setup(): LightningCLI links data.num_classes into the model.
    @property
    def annotation_format(self) -> str:
        """``"kinetics"`` or ``"list"``, detected from the files under ``root``."""
        return find_annotation_format(self.root)

    @property
    def class_names(self) -> list[str]:
        """Class names in index order (sorted unique train labels, or ``classes.txt`` / numbers for lists)."""
        if self._class_names is None:
            if self.annotation_format == "kinetics":
                self._class_names = _kinetics_class_names(self.root)
            else:
                self._class_names = _list_class_names(self.root)
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes, read from the annotations (works before ``setup()``)."""
        return len(self.class_names)

    def has_split(self, split: str) -> bool:
        """Whether annotations exist for ``split``."""
        if self.annotation_format == "kinetics":
            return _find_file(self.root / "annotations", split, (".csv",)) is not None
        return _find_file(self.root, split, (".csv", ".txt")) is not None

    def samples(self, split: str) -> list[VideoSample]:
        """The labelled videos of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        if self.annotation_format == "kinetics":
            return read_kinetics_annotations(self.root, split, self.class_names)
        return read_labeled_paths(self.root, split, self.num_classes)

    def train_transform(self) -> VideoTrainTransform:
        """The training augmentation."""
        return VideoTrainTransform(
            self.num_frames,
            self.crop_size,
            self.min_short_side,
            self.max_short_side,
            self.flip_prob,
            mean=self.mean,
            std=self.std,
        )

    def eval_transform(self, num_crops: int = 1) -> VideoEvalTransform:
        """The evaluation transform with ``num_crops`` spatial views."""
        return VideoEvalTransform(
            self.num_frames, self.crop_size, self.min_short_side, num_crops, mean=self.mean, std=self.std
        )

    def make_dataset(self, split: str, mode: str | None = None) -> VideoClipDataset:
        """Build the dataset of ``split`` in ``mode`` (default: the split's own mode)."""
        mode = mode or split
        if mode == "train":
            transform, clips, crops = self.train_transform(), 1, 1
        elif mode == "val":
            transform, clips, crops = self.eval_transform(1), 1, 1
        else:
            transform, clips, crops = self.eval_transform(self.test_crops), self.test_clips, self.test_crops
        return VideoClipDataset(
            self.samples(split),
            mode,
            transform,
            self.num_frames,
            self.sampling_rate,
            num_clips=clips,
            num_crops=crops,
            decoder=self.decoder,
            max_retries=self.max_retries,
            seed=self.seed,
            clips_per_video=self.clips_per_video if mode == "train" else 1,
            decoder_threads=self.reader_threads(),
            decode_time_resize=self.decode_time_resize,
            target_fps=self.target_fps,
        )

    def _test_split(self) -> str:
        if self.has_split("test"):
            return "test"
        # Many Kinetics copies ship without test annotations; the validation set is the usual stand-in.
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"{self.root}: no test annotations, testing on the val split")
        return "val"

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (``fit``, ``validate``, ``test``, ``predict`` or None for all)."""
        if stage in ("fit", None) and "train" not in self.datasets:
            self.datasets["train"] = self.make_dataset("train")
        if stage in ("fit", "validate", None) and "val" not in self.datasets:
            self.datasets["val"] = self.make_dataset("val")
        if stage in ("test", "predict", None) and "test" not in self.datasets:
            self.datasets["test"] = self.make_dataset(self._test_split(), "test")

    def train_dataloader(self) -> DataLoader:
        """Shuffled training clips (``clips_per_video`` random clips per video per epoch)."""
        collate = collate_multi_clip if self.clips_per_video > 1 else None
        return self._loader("train", True, self.batch_size, self.drop_last, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        """Center clip, center crop of every validation video."""
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """``test_clips x test_crops`` views of every test video, in order (views of a video are consecutive)."""
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """Same views as :meth:`test_dataloader`."""
        return self.test_dataloader()
