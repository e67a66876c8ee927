"""Video decoding through PyAV (default), decord or torchcodec, with one error type for every unreadable file.

The entry points are :func:`open_video` (a reader that knows the frame count and fps and decodes
only the frames asked for, see :mod:`datamodules.decoders` for the backends), and the convenience
wrappers :func:`probe`, :func:`read_video` and :func:`read_clip`. Every failure to read a file (missing,
truncated, corrupt, not a video) raises :class:`VideoDecodeError`, so datasets need to catch a single
exception type. :data:`VIDEO_EXTENSIONS` is the one list of file extensions that folder scans (data
modules, ``tools/infer.py``, ``tools/benchmark_data.py``) accept.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .decoders import DECODERS, VideoDecodeError, VideoInfo, VideoReader, open_reader

__all__ = [
    "DECODERS",
    "VIDEO_EXTENSIONS",
    "Video",
    "VideoDecodeError",
    "VideoInfo",
    "VideoReader",
    "check_target_fps",
    "clip_indices",
    "clip_span",
    "find_videos",
    "is_video_file",
    "open_video",
    "probe",
    "read_clip",
    "read_video",
    "source_step",
]

#: Extensions of the common video containers (MP4/QuickTime, Matroska/WebM, AVI, MPEG program and
#: transport streams, Blu-ray M2TS, ASF/WMV, Flash, 3GPP, Ogg), compared case-insensitively.
VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".m2ts", ".mts", ".wmv", ".flv",
    ".3gp", ".ogv",
)


@dataclass
class Video:
    """Decoded frames with their timing.

    Attributes:
        frames: uint8 tensor (T, H, W, 3), RGB.
        fps: frame rate of the source.
        duration: duration of the source in seconds.
    """

    frames: torch.Tensor
    fps: float
    duration: float


def open_video(
    path: str | os.PathLike, decoder: str = "pyav", threads: int = 1, decode_time_resize: bool = False
) -> VideoReader:
    """Open a video file for frame-accurate reading.

    Args:
        path: video file.
        decoder: ``"pyav"`` (default), ``"decord"``, ``"torchcodec"`` or ``"auto"`` (see
            :mod:`datamodules.decoders`).
        threads: decoding threads of this reader (1 when each DataLoader worker owns one core).
        decode_time_resize: with PyAV, clips asked at another size are scaled by libswscale during the
            RGB conversion rather than by torch afterwards (see :func:`datamodules.decoders.open_reader`).

    Raises:
        VideoDecodeError: the file is missing, empty, not a video, or its header is unreadable.
        ValueError: unknown decoder, or one that cannot load on this machine.
    """
    return open_reader(path, decoder, threads, decode_time_resize)


def probe(path: str | os.PathLike, decoder: str = "pyav") -> VideoInfo:
    """Read a video's metadata (frame count, fps, duration, size) without decoding frames."""
    with open_video(path, decoder) as reader:
        return reader.info


def read_video(path: str | os.PathLike, decoder: str = "pyav") -> Video:
    """Decode every frame of a video.

    Returns:
        :class:`Video` with uint8 frames (T, H, W, 3).
    """
    with open_video(path, decoder) as reader:
        frames = reader.get_frames(range(reader.info.num_frames))
        return Video(frames, reader.info.fps, reader.info.duration)


def clip_indices(num_video_frames: int, start_frame: int, num_frames: int, sampling_rate: float) -> list[int]:
    """Frame indices of a clip: ``num_frames`` frames every ``sampling_rate`` source frames from ``start_frame``.

    ``sampling_rate`` may be fractional (a clip rate set in frames of a ``target_fps``, see
    :func:`source_step`); frame ``i`` is then the source frame nearest ``start_frame + i * sampling_rate``.
    When the clip would run past the end of a short video, the frames are spread uniformly over
    what is available from ``start_frame`` (so a short video gives a slower clip rather than frozen frames).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not math.isfinite(sampling_rate) or sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be a positive number, got {sampling_rate}")
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}")
    start_frame = min(max(start_frame, 0), num_video_frames - 1)
    # Half-up rounding (not Python's half-to-even) keeps a fractional rate's steps evenly spread.
    indices = [start_frame + math.floor(i * sampling_rate + 0.5) for i in range(num_frames)]
    if indices[-1] <= num_video_frames - 1:
        return indices
    end = num_video_frames - 1
    return [round(x) for x in np.linspace(start_frame, end, num_frames)]


def clip_span(num_frames: int, sampling_rate: float) -> int:
    """Source frames a clip of ``num_frames`` frames every ``sampling_rate`` frames covers, ends included."""
    return math.floor((num_frames - 1) * sampling_rate + 0.5) + 1


def source_step(sampling_rate: int, fps: float, target_fps: float | None) -> float:
    """Distance between clip frames in a video's own frames.

    Without ``target_fps`` it is ``sampling_rate`` source frames, whatever the video's rate. With
    ``target_fps`` (PySlowFast's ``TARGET_FPS``) ``sampling_rate`` counts frames of a video resampled to
    ``target_fps``, so every clip spans the same time: ``sampling_rate * fps / target_fps`` source frames
    (8 at 30 fps for ``sampling_rate=8, target_fps=30``; about 6.67 at 25 fps and 16 at 60 fps).
    """
    if target_fps is None:
        return sampling_rate
    if not fps > 0:
        raise ValueError(f"fps must be positive to resample a clip to target_fps={target_fps}, got {fps}")
    return sampling_rate * fps / target_fps


def check_target_fps(target_fps: float | None) -> float | None:
    """``target_fps`` as a float, ``None`` kept; raise a ``ValueError`` naming it unless it is a positive number."""
    if target_fps is None:
        return None
    if isinstance(target_fps, bool) or not isinstance(target_fps, (int, float)) or not (
        math.isfinite(target_fps) and target_fps > 0
    ):
        raise ValueError(f"target_fps must be a positive number of frames per second or None, got {target_fps!r}")
    return float(target_fps)


def read_clip(
    path: str | os.PathLike,
    start_sec: float,
    num_frames: int,
    sampling_rate: int = 1,
    decoder: str = "pyav",
    target_fps: float | None = None,
) -> torch.Tensor:
    """Decode one clip, seeking to it rather than decoding the whole file.

    Args:
        path: video file.
        start_sec: time of the clip's first frame, in seconds.
        num_frames: number of frames returned.
        sampling_rate: distance between returned frames, in source frames (in frames at ``target_fps``
            when that is given, see :func:`source_step`).
        decoder: a backend name of :data:`DECODERS` or ``"auto"``.
        target_fps: the frame rate ``sampling_rate`` is counted at; ``None``: the video's own.

    Returns:
        uint8 tensor (num_frames, H, W, 3). A clip reaching past the end of the video is spread over
        the remaining frames (see :func:`clip_indices`).
    """
    if not math.isfinite(start_sec) or start_sec < 0:
        raise ValueError(f"start_sec must be a finite number >= 0, got {start_sec}")
    target_fps = check_target_fps(target_fps)
    with open_video(path, decoder) as reader:
        start_frame = round(start_sec * reader.info.fps)
        step = source_step(sampling_rate, reader.info.fps, target_fps)
        indices = clip_indices(reader.info.num_frames, start_frame, num_frames, step)
        return reader.get_frames(indices)


def is_video_file(path: str | os.PathLike) -> bool:
    """Whether the file name has a common video extension."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def find_videos(paths: Iterable[str | os.PathLike], extensions: Iterable[str] = VIDEO_EXTENSIONS) -> list[Path]:
    """Files named in ``paths``, with folders searched recursively for ``extensions`` (case-insensitive).

    Each folder's files come sorted, without hidden files and folders (names starting with ``.``, such as
    macOS's ``._clip.mp4`` AppleDouble files); named files are kept whatever their extension or name.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    suffixes = {suffix.lower() for suffix in extensions}
    found: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found.extend(sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ))
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"input path {path} does not exist")
    return found
