"""Video decoding through PyAV (default) or decord, with one error type for every unreadable file.

The entry points are :func:`open_video` (a reader that knows the frame count and fps and decodes
only the frames asked for), and the convenience wrappers :func:`probe`, :func:`read_video` and
:func:`read_clip`. Every failure to read a file (missing, truncated, corrupt, not a video) raises
:class:`VideoDecodeError`, so datasets need to catch a single exception type.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DECODERS",
    "VIDEO_EXTENSIONS",
    "Video",
    "VideoDecodeError",
    "VideoInfo",
    "VideoReader",
    "clip_indices",
    "is_video_file",
    "open_video",
    "probe",
    "read_clip",
    "read_video",
]

DECODERS = ("pyav", "decord")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")

# A container header may promise a frame or two more than the decoder delivers (edit lists,
# a dropped last frame); a shortfall up to this fraction is padded, anything larger is a truncated file.
_TRUNCATION_TOLERANCE = 0.05


class VideoDecodeError(Exception):
    """A video file could not be read: missing, truncated, corrupt or not a video.

    Args:
        path: the file that failed.
        reason: a short human-readable explanation ("file not found", "truncated: ...", ...).
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # Exceptions with a custom __init__ signature must say how to rebuild themselves to cross
        # process boundaries (DataLoader workers re-raise exceptions in the main process).
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class VideoInfo:
    """Metadata of a video stream.

    Attributes:
        path: the file.
        num_frames: number of frames (from the container header, or estimated from duration x fps).
        fps: average frame rate.
        duration: duration in seconds.
        height: frame height in pixels.
        width: frame width in pixels.
    """

    path: str
    num_frames: int
    fps: float
    duration: float
    height: int
    width: int


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


def _check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file")


class VideoReader:
    """An open video file; decodes only the frames asked for.

    Use :func:`open_video` to create one; it is a context manager.

    Attributes:
        info: the stream's :class:`VideoInfo`.
    """

    info: VideoInfo

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Decode the frames at ``indices`` (any order, repeats allowed).

        Indices past the end are clamped to the last frame.

        Returns:
            uint8 tensor (len(indices), H, W, 3).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PyAVReader(VideoReader):
    """PyAV reader: seeks to the keyframe before the first wanted frame and decodes forward."""

    def __init__(self, path: str) -> None:
        import av

        self.path = path
        try:
            self._container = av.open(path)
        except Exception as error:  # av raises many error types (InvalidDataError, OSError, ...)
            raise VideoDecodeError(path, _open_failure(path, error)) from error
        if not self._container.streams.video:
            self._container.close()
            raise VideoDecodeError(path, "no video stream")
        stream = self._container.streams.video[0]
        self._stream = stream
        rate = stream.average_rate or stream.base_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif self._container.duration is not None:
            duration = self._container.duration / 1e6
        else:
            duration = 0.0
        num_frames = int(stream.frames or 0)
        if num_frames <= 0 and fps > 0:
            num_frames = round(duration * fps)
        if num_frames <= 0 or fps <= 0:
            self._container.close()
            raise VideoDecodeError(path, "no frames (header has no frame count, rate or duration)")
        if duration <= 0:
            duration = num_frames / fps
        self._start_pts = stream.start_time or 0
        # Frames decoded so far (diagnostics: shows that seeking skipped the start of the file).
        self.frames_decoded = 0
        self.info = VideoInfo(path, num_frames, fps, duration, stream.height, stream.width)

    def _frame_index(self, frame) -> int:
        seconds = float((frame.pts - self._start_pts) * self._stream.time_base)
        return round(seconds * self.info.fps)

    def _decode_from(self, first_index: int, wanted: list[int]) -> tuple[dict[int, np.ndarray], int]:
        """Decode from the keyframe before ``first_index``; returns frames by wanted index and the last index seen."""
        stream = self._stream
        target_pts = self._start_pts + int(first_index / self.info.fps / stream.time_base)
        self._container.seek(target_pts, stream=stream, backward=True, any_frame=False)
        found: dict[int, np.ndarray] = {}
        position = 0  # next wanted index to fill
        last_seen = -1
        for frame in self._container.decode(stream):
            self.frames_decoded += 1
            index = self._frame_index(frame) if frame.pts is not None else last_seen + 1
            if last_seen < 0 and first_index > 0 and index > wanted[0]:
                # The seek landed after the frame we need (bad index in the file): caller falls back.
                return {}, index
            last_seen = index
            image = None
            # A frame stands for every wanted index up to its own (covers gaps in variable-rate files).
            while position < len(wanted) and wanted[position] <= index:
                if image is None:
                    image = frame.to_ndarray(format="rgb24")
                found[wanted[position]] = image
                position += 1
            if position == len(wanted):
                break
        return found, last_seen

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        if len(indices) == 0:
            raise ValueError("indices must not be empty")
        last = self.info.num_frames - 1
        clamped = [min(max(int(i), 0), last) for i in indices]
        wanted = sorted(set(clamped))
        try:
            found, last_seen = self._decode_from(wanted[0], wanted)
            if not found and wanted[0] > 0:
                found, last_seen = self._decode_from(0, wanted)
        except VideoDecodeError:
            raise
        except Exception as error:
            raise VideoDecodeError(self.path, f"decoding failed: {_short(error)}") from error
        if not found:
            raise VideoDecodeError(self.path, "no frame could be decoded")
        missing = [i for i in wanted if i not in found]
        if missing:
            decoded_until = max(last_seen, max(found)) + 1
            if decoded_until < self.info.num_frames * (1 - _TRUNCATION_TOLERANCE):
                raise VideoDecodeError(
                    self.path,
                    f"truncated: header says {self.info.num_frames} frames, stream ended after {decoded_until}",
                )
            tail = found[max(found)]
            for i in missing:
                found[i] = tail
        return torch.from_numpy(np.stack([found[i] for i in clamped]))

    def close(self) -> None:
        self._container.close()


class _DecordReader(VideoReader):
    """decord reader: random access by frame index."""

    def __init__(self, path: str) -> None:
        try:
            import decord
        except ImportError as error:  # decord has wheels for x86-64 Linux only
            raise ValueError("decoder='decord' needs the decord package (pip install decord)") from error
        self.path = path
        try:
            self._reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
            num_frames = len(self._reader)
            fps = float(self._reader.get_avg_fps())
        except Exception as error:  # decord raises DECORDError or RuntimeError
            raise VideoDecodeError(path, _open_failure(path, error)) from error
        height, width = self._frame_size(path)
        if num_frames <= 0 or fps <= 0:
            raise VideoDecodeError(path, "no frames")
        self.info = VideoInfo(path, num_frames, fps, num_frames / fps, height, width)

    def _frame_size(self, path: str) -> tuple[int, int]:
        """(height, width) from the container header; decord has no accessor short of decoding a frame."""
        import av

        try:
            with av.open(path) as container:
                stream = container.streams.video[0]
                if stream.height and stream.width:
                    return int(stream.height), int(stream.width)
        except Exception:  # decord opened it, so fall back to decoding the first frame
            pass
        try:
            height, width = self._reader[0].shape[:2]
        except Exception as error:
            raise VideoDecodeError(path, f"decoding failed: {_short(error)}") from error
        return int(height), int(width)

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        if len(indices) == 0:
            raise ValueError("indices must not be empty")
        last = self.info.num_frames - 1
        clamped = [min(max(int(i), 0), last) for i in indices]
        try:
            frames = self._reader.get_batch(clamped).asnumpy()
        except Exception as error:
            raise VideoDecodeError(self.path, f"decoding failed: {_short(error)}") from error
        return torch.from_numpy(np.ascontiguousarray(frames))

    def close(self) -> None:
        del self._reader


def _short(error: BaseException) -> str:
    """One line of a PyAV/decord error message, without errno, log prefixes or the repeated file name."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text)  # PyAV: "[Errno 1094995529] Invalid data found ..."
    text = re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", text)  # decord: "[03:15:11] /src/file.cc:61: ..."
    text = re.sub(r":\s*'[^']*'$", "", text)  # PyAV appends ": '<file name>'"
    return text[:160] or type(error).__name__


def _looks_like_video(path: str) -> bool:
    """Whether the file starts like a video container (MP4/MOV, Matroska/WebM, AVI, MPEG-PS)."""
    with open(path, "rb") as handle:
        head = handle.read(12)
    return (
        head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
        or head.startswith(b"\x1a\x45\xdf\xa3")
        or (head.startswith(b"RIFF") and head[8:12] == b"AVI ")
        or head.startswith(b"\x00\x00\x01\xba")
    )


def _open_failure(path: str, error: BaseException) -> str:
    """Reason for a file that exists but cannot be opened: a damaged video, or not a video at all."""
    kind = "corrupt or truncated video" if _looks_like_video(path) else "not a video file"
    return f"{kind} (cannot open: {_short(error)})"


def open_video(path: str | os.PathLike, decoder: str = "pyav") -> VideoReader:
    """Open a video file for frame-accurate reading.

    Args:
        path: video file.
        decoder: ``"pyav"`` (default) or ``"decord"``.

    Raises:
        VideoDecodeError: the file is missing, empty, not a video, or its header is unreadable.
        ValueError: unknown decoder.
    """
    _check_decoder(decoder)
    path = os.fspath(path)
    _check_exists(path)
    return _PyAVReader(path) if decoder == "pyav" else _DecordReader(path)


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


def clip_indices(num_video_frames: int, start_frame: int, num_frames: int, sampling_rate: int) -> list[int]:
    """Frame indices of a clip: ``num_frames`` frames every ``sampling_rate`` source frames from ``start_frame``.

    When the clip would run past the end of a short video, the frames are spread uniformly over
    what is available from ``start_frame`` (so a short video gives a slower clip rather than frozen frames).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if sampling_rate < 1:
        raise ValueError(f"sampling_rate must be >= 1, got {sampling_rate}")
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}")
    start_frame = min(max(start_frame, 0), num_video_frames - 1)
    span = (num_frames - 1) * sampling_rate
    if start_frame + span <= num_video_frames - 1:
        return [start_frame + i * sampling_rate for i in range(num_frames)]
    end = num_video_frames - 1
    return [round(x) for x in np.linspace(start_frame, end, num_frames)]


def read_clip(
    path: str | os.PathLike,
    start_sec: float,
    num_frames: int,
    sampling_rate: int = 1,
    decoder: str = "pyav",
) -> torch.Tensor:
    """Decode one clip, seeking to it rather than decoding the whole file.

    Args:
        path: video file.
        start_sec: time of the clip's first frame, in seconds.
        num_frames: number of frames returned.
        sampling_rate: distance between returned frames, in source frames.
        decoder: ``"pyav"`` or ``"decord"``.

    Returns:
        uint8 tensor (num_frames, H, W, 3). A clip reaching past the end of the video is spread over
        the remaining frames (see :func:`clip_indices`).
    """
    if not math.isfinite(start_sec) or start_sec < 0:
        raise ValueError(f"start_sec must be a finite number >= 0, got {start_sec}")
    with open_video(path, decoder) as reader:
        start_frame = round(start_sec * reader.info.fps)
        indices = clip_indices(reader.info.num_frames, start_frame, num_frames, sampling_rate)
        return reader.get_frames(indices)


def is_video_file(path: str | os.PathLike) -> bool:
    """Whether the file name has a common video extension."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS
