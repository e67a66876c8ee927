"""Video decoder backends behind one small interface: PyAV, decord and torchcodec.

A backend opens a file into a :class:`VideoReader`, which knows the stream's :class:`VideoInfo` and
decodes frames by index. :meth:`VideoReader.get_clips` decodes several clips of one video in a single
pass and can resize each clip to its own size while decoding; datasets use it to draw many training
clips from one read of a file.

Backends, chosen by name (``decoder=``) or ``"auto"``:

* ``"pyav"``: always available (a core dependency). Only the frames that are kept are converted to
  RGB, and they are scaled by libswscale in the same step; frames that are neither kept nor needed as
  references are not decoded at all (``skip_frame``) for the codecs known to honour it.
* ``"decord"``: random access with one batched ``get_batch`` call per read (x86-64 wheels only).
* ``"torchcodec"``: PyTorch's decoder. It links against the system's FFmpeg libraries (``apt-get install
  ffmpeg``), so it is an optional extra (``pip install oct3d[torchcodec]``); :func:`available_decoders`
  tells whether it loads here.

``"auto"`` resolves to the first loadable backend of :data:`AUTO_ORDER`.

Every failure to read a file (missing, truncated, corrupt, not a video) raises :class:`VideoDecodeError`.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# PyAV's FFmpeg libraries must load before decord's: decord's wheel bundles older builds (libvpx among
# them) whose symbols, when loaded first, are used by PyAV too and break its VP8/VP9 encoder
# ("avcodec_open2(libvpx-vp9) returned 22"). Importing av here, before any decord import, fixes the order.
import av
import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

__all__ = [
    "AUTO_ORDER",
    "DECODERS",
    "VideoDecodeError",
    "VideoInfo",
    "VideoReader",
    "available_decoders",
    "decoder_available",
    "open_reader",
    "require_decoder",
    "resolve_decoder",
]

#: Backend names accepted by ``decoder=`` (besides ``"auto"``).
DECODERS = ("pyav", "decord", "torchcodec")
#: Preference of ``decoder="auto"``: the first backend that loads is used. PyAV comes first because
#: its decode-time scaling and reference-frame skipping make it the fastest CPU training loader measured
#: (docs/video_data.md); torchcodec and decord are fallbacks.
AUTO_ORDER = ("pyav", "torchcodec", "decord")

# A container header may promise a frame or two more than the decoder delivers (edit lists,
# a dropped last frame); a shortfall up to this fraction (or these frames) is padded with the last frame,
# anything larger is a truncated file.
_TRUNCATION_TOLERANCE = 0.05
_TRUNCATION_TOLERANCE_FRAMES = 2
# Codecs whose decoders skip only non-reference frames under skip_frame=NONREF (B-frames for the MPEG
# family, nal_ref_idc == 0 for H.264/HEVC). Other decoders ignore the flag or read it differently, so
# they decode every frame.
_SKIP_NONREF_CODECS = frozenset({"h264", "hevc", "mpeg1video", "mpeg2video", "mpeg4"})
# After the first packet at or past the last wanted frame, B-frames that display earlier may still
# follow in decode order; this many more packets are demuxed (not decoded) to find them. H.264 and
# HEVC allow at most 16 frames of reordering.
_REORDER_WINDOW = 16
# Containers (FFmpeg demuxer names) without a frame count whose duration FFmpeg only estimates.
_ESTIMATED_DURATION_FORMATS = frozenset({"mpeg", "mpegts", "mpegvideo", "m4v", "h264", "hevc"})


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
        height: frame height in pixels (PyAV: as stored; torchcodec applies rotation metadata).
        width: frame width in pixels.
    """

    path: str
    num_frames: int
    fps: float
    duration: float
    height: int
    width: int


Size = tuple[int, int]


def _resize_thwc(frames: torch.Tensor, size: Size | None) -> torch.Tensor:
    """Resize uint8 frames (T, H, W, 3) to ``size`` = (height, width) (bilinear, antialiased)."""
    if size is None or tuple(frames.shape[1:3]) == tuple(size):
        return frames
    resized = F.resize(frames.permute(0, 3, 1, 2), list(size), antialias=True)
    return resized.permute(0, 2, 3, 1)


class VideoReader:
    """An open video file; decodes only the frames asked for.

    Use :func:`open_reader` (or :func:`datamodules.video.open_video`) to create one; it is a context manager.

    Attributes:
        path: the file.
        info: the stream's :class:`VideoInfo`.
        name: the backend's name.
    """

    path: str
    info: VideoInfo
    name: str = ""

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Decode the frames at ``indices`` (any order, repeats allowed).

        Indices past the end are clamped to the last frame.

        Returns:
            uint8 tensor (len(indices), H, W, 3), RGB (possibly a non-contiguous view).
        """
        raise NotImplementedError

    def get_clips(
        self, clips: Sequence[Sequence[int]], sizes: Sequence[Size | None] | None = None
    ) -> list[torch.Tensor]:
        """Decode several clips of this video in one pass.

        Args:
            clips: frame indices of each clip (as for :meth:`get_frames`).
            sizes: per clip, ``(height, width)`` to resize its frames to, or None to keep the stored size.
                Backends that can scale while decoding do so (PyAV: libswscale); the others resize with
                torchvision (bilinear, antialiased).

        Returns:
            one uint8 tensor (len(clip), h, w, 3) per clip.
        """
        clips, sizes = _check_clips(clips, sizes)
        union = sorted({min(max(int(i), 0), self.info.num_frames - 1) for clip in clips for i in clip})
        frames = self.get_frames(union)
        position = {index: row for row, index in enumerate(union)}
        out = []
        for clip, size in zip(clips, sizes):
            rows = torch.tensor([position[min(max(int(i), 0), self.info.num_frames - 1)] for i in clip])
            out.append(_resize_thwc(frames[rows], size))
        return out

    def frame_times(self) -> list[float] | None:
        """Each frame's presentation time in seconds from the first frame, for a variable-rate stream
        whose timestamps this reader has read; ``None`` where the frames are taken as evenly spaced at
        ``info.fps`` (constant-rate streams, and backends that give no per-frame times)."""
        return None

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_clips(
    clips: Sequence[Sequence[int]], sizes: Sequence[Size | None] | None
) -> tuple[list[list[int]], list[Size | None]]:
    clips = [list(clip) for clip in clips]
    if not clips or any(len(clip) == 0 for clip in clips):
        raise ValueError("clips must hold at least one clip, each with at least one frame index")
    if sizes is None:
        sizes = [None] * len(clips)
    sizes = list(sizes)
    if len(sizes) != len(clips):
        raise ValueError(f"sizes must have one entry per clip ({len(clips)}), got {len(sizes)}")
    for size in sizes:
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ValueError(f"each size must be None or (height, width) with positive ints, got {size!r}")
    return clips, [None if size is None else (int(size[0]), int(size[1])) for size in sizes]


# --------------------------------------------------------------------------------------------- errors
def _short(error: BaseException) -> str:
    """One line of a backend's error message, without errno, log prefixes or the repeated file name."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text)  # PyAV: "[Errno 1094995529] Invalid data found ..."
    text = re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", text)  # decord: "[03:15:11] /src/file.cc:61: ..."
    text = re.sub(r":\s*'[^']*'$", "", text)  # PyAV appends ": '<file name>'"
    return text[:160] or type(error).__name__


def _looks_like_video(path: str) -> bool:
    """Whether the file starts like a video container (MP4/MOV, Matroska/WebM, AVI, MPEG-PS/TS, ASF, FLV, Ogg)."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    return (
        head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
        or head.startswith(b"\x1a\x45\xdf\xa3")
        or (head.startswith(b"RIFF") and head[8:12] == b"AVI ")
        or head.startswith(b"\x00\x00\x01\xba")
        or head.startswith(b"\x00\x00\x01\xb3")
        or _is_mpeg_ts(path)
        or head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11")  # ASF (wmv)
        or head.startswith(b"FLV")
        or head.startswith(b"OggS")
    )


def _is_mpeg_ts(path: str) -> bool:
    """Whether the file is an MPEG transport stream: 188-byte packets (.ts) or 192-byte ones (.m2ts/.mts)."""
    with open(path, "rb") as handle:
        head = handle.read(400)
    return (head[:1] == head[188:189] == b"\x47") or (head[4:5] == head[196:197] == b"\x47")


def _refuse_mpeg_streams(path: str, backend: str, program_streams: bool) -> None:
    # decord and torchcodec seek imprecisely in MPEG transport streams (torchcodec in program streams too):
    # they fail on B-frame H.264 and, worse, can return frames from the wrong position without an error
    # (tests/test_codec_matrix.py). PyAV reads these files.
    if _is_mpeg_ts(path):
        kind = "MPEG transport streams"
    elif program_streams and _is_mpeg_ps(path):
        kind = "MPEG program streams"
    else:
        return
    raise VideoDecodeError(path, f"{kind} are not read reliably by {backend}; use decoder='pyav'")


def _is_mpeg_ps(path: str) -> bool:
    """Whether the file is an MPEG program stream (.mpg/.mpeg/.vob: a pack header first)."""
    with open(path, "rb") as handle:
        return handle.read(4) == b"\x00\x00\x01\xba"


def _open_failure(path: str, error: BaseException) -> str:
    """Reason for a file that exists but cannot be opened: a damaged video, a container with no
    video stream (decord and torchcodec fail on an audio-only file with their own wording), or not
    a video at all."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return "no video stream"
    except (av.error.FFmpegError, OSError, ValueError):
        pass
    kind = "corrupt or truncated video" if _looks_like_video(path) else "not a video file"
    return f"{kind} (cannot open: {_short(error)})"


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file")


def _clamp(indices: Sequence[int], num_frames: int) -> list[int]:
    last = num_frames - 1
    return [min(max(int(i), 0), last) for i in indices]


def _fill_tail(path: str, found: dict[int, object], wanted: list[int], decoded_until: int, num_frames: int) -> None:
    """Pad wanted frames past the end of the stream with its last frame, unless the file is truncated."""
    missing = [i for i in wanted if i not in found]
    if not missing:
        return
    tolerance = max(num_frames * _TRUNCATION_TOLERANCE, _TRUNCATION_TOLERANCE_FRAMES)
    if not found:
        first = min(wanted)
        if 0 < first < num_frames - tolerance:  # the seek landed past the data of a cut file that keeps its header
            raise VideoDecodeError(
                path, f"truncated: header says {num_frames} frames, none decodes from frame {first} on"
            )
        raise VideoDecodeError(path, "no frame could be decoded")
    decoded_until = max(decoded_until, max(found) + 1)
    if decoded_until < num_frames - tolerance:
        raise VideoDecodeError(
            path, f"truncated: header says {num_frames} frames, stream ended after {decoded_until}"
        )
    tail = found[max(found)]
    for i in missing:
        found[i] = tail


# --------------------------------------------------------------------------------------------- PyAV
def _index_timestamps(stream: object) -> list[int]:
    """The timestamps of a stream's index entries (MP4/MOV: every frame's decode time; most other
    formats: none or a few keyframes)."""
    try:
        return [entry.timestamp for entry in stream.index_entries]
    except Exception:  # an older PyAV without index_entries: no cheap rate check
        return []


def _steps(timestamps: list[int]) -> list[int]:
    """The sorted gaps between successive sorted ``timestamps``."""
    return sorted(b - a for a, b in itertools.pairwise(sorted(timestamps)))


def _median_step(timestamps: list[int]) -> int:
    """The typical gap between successive ``timestamps`` (one frame), 0 for fewer than two."""
    steps = _steps(timestamps)
    return steps[len(steps) // 2] if steps else 0


def _uniform(timestamps: list[int]) -> bool:
    """Whether sorted ``timestamps`` are evenly spaced (a constant frame rate), within one tick of the
    time base and 1% of the step (a millisecond time base rounds 30 fps to steps of 33 and 34)."""
    steps = _steps(timestamps)
    if not steps:
        return True
    typical = steps[len(steps) // 2]
    return steps[0] >= typical - 1 - 0.01 * typical and steps[-1] <= typical + 1 + 0.01 * typical

# PyAV reformatters (swscale contexts) by output size, per thread and process: they are not thread-safe,
# and a context made before a fork would be used without its slice threads (a deadlock) in the child.
_THREAD_STATE = threading.local()
_MAX_REFORMATTERS = 32
_REFORMAT_TAKES_THREADS = True


def _reformatters() -> dict:
    if getattr(_THREAD_STATE, "pid", None) != os.getpid():
        _THREAD_STATE.pid = os.getpid()
        _THREAD_STATE.reformatters = {}
    return _THREAD_STATE.reformatters


class _PyAVReader(VideoReader):
    """PyAV reader: seeks to the keyframe before the first wanted frame and decodes forward.

    Packets are demuxed first (cheap) so that each wanted index maps to the frame that shows it; frames
    that show no wanted index are skipped when the codec can drop them (non-reference frames), and only
    frames that are kept are converted to RGB, at the size each clip asks for.

    Frame ``i`` is the ``i``-th frame in presentation order, as for decord and torchcodec. A
    constant-rate stream maps timestamps to indices on its frame-rate grid; a variable-rate one
    (phone recordings, screen captures, a stream with a freeze), found from the container's index
    (MP4/MOV) or from its packets (formats without a frame count), through a table of every frame's
    timestamp, made by demuxing the file once (a few milliseconds; no decoding).
    """

    name = "pyav"

    def __init__(self, path: str, threads: int = 1, decode_time_resize: bool = False) -> None:
        self.path = path
        self._threads = threads
        # Scale in libswscale while converting to RGB (one pass) instead of resizing RGB frames with torch
        # afterwards. Measured slower than torch's uint8 channels-last resize (docs/video_data.md), so opt-in.
        self.decode_time_resize = decode_time_resize
        # Frames the decoder produced so far (diagnostics: shows that seeking and skipping worked).
        self.frames_decoded = 0
        self._open()
        try:
            self._setup()
        except BaseException:
            self._container.close()
            raise

    def _open(self) -> None:
        try:
            self._container = av.open(self.path)
        except Exception as error:  # av raises many error types (InvalidDataError, OSError, ...)
            raise VideoDecodeError(self.path, _open_failure(self.path, error)) from error
        self._fresh = True  # the demuxer is at the first packet: no seek needed to start there
        if not self._container.streams.video:
            self._container.close()
            raise VideoDecodeError(self.path, "no video stream")
        stream = self._container.streams.video[0]
        if self._threads > 1:
            stream.thread_type = "AUTO"
        stream.codec_context.thread_count = max(self._threads, 1)
        self._stream = stream

    def _rewind(self) -> None:
        """Back to the first packet by reopening: seeking to 0 is unreliable in MPEG program/transport streams."""
        self._container.close()
        self._open()

    def _setup(self) -> None:
        stream = self._stream
        rate = stream.average_rate or stream.base_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif self._container.duration is not None:
            duration = self._container.duration / 1e6
        else:
            duration = 0.0
        num_frames = int(stream.frames or 0)
        if not stream.width or not stream.height:
            raise VideoDecodeError(self.path, "video stream has no frame size (undecodable codec parameters)")
        self._start_pts = stream.start_time or 0
        self._pts_table: list[int] | None = None  # every frame's pts in presentation order (variable rate)
        self._pts_index: dict[int, int] = {}
        entries = _index_timestamps(stream)
        if num_frames > 1 and len(entries) == num_frames and not _uniform(entries):
            # A variable-rate MP4/MOV: its index holds decode times, and the table needs display times.
            _, pts = self._demux_timestamps()
            stream = self._stream
            if pts and not _uniform(pts):
                self._use_pts_table(pts)
                num_frames = len(pts)
                fps = self._table_rate(fps)
        elif num_frames <= 0:
            # No frame count in the header: count the packets (demuxing, no decoding). FFmpeg only estimates
            # some of these formats' durations (from the bit rate or the last timestamps), far off at times,
            # and a variable-rate stream (Matroska/WebM, MPEG-TS) needs its timestamps anyway.
            count, pts = self._demux_timestamps()
            stream = self._stream
            estimated = self._container.format.name.split(",")[0] in _ESTIMATED_DURATION_FORMATS
            if pts and duration > 0 and not estimated and self._cut_short(pts, duration):
                # A cut download: its duration stands, so that reading the missing tail is reported as
                # truncated, while the intact start still reads.
                count, pts = 0, None
            if count:
                num_frames = count
                if pts and not _uniform(pts):
                    self._use_pts_table(pts)
                    fps = self._table_rate(fps)
                    duration = num_frames / fps
                elif estimated and fps > 0:
                    duration = num_frames / fps
        if num_frames <= 0 and fps > 0:
            num_frames = round(duration * fps)
        if num_frames <= 0 or fps <= 0:
            raise VideoDecodeError(self.path, "no frames (header has no frame count, rate or duration)")
        if duration <= 0:
            duration = num_frames / fps
        self._skip_nonref = stream.codec_context.name in _SKIP_NONREF_CODECS
        self._frames_per_tick = float(stream.time_base) * fps
        self.info = VideoInfo(self.path, num_frames, fps, duration, stream.height, stream.width)

    def _demux_timestamps(self) -> tuple[int, list[int] | None]:
        """The number of frame packets and their sorted pts (None when some packet has none), then back to the
        first packet. Packets the decoder discards (the head an MP4 edit list cuts) are left out."""
        pts: list[int] = []
        count = 0
        complete = True
        video = self._stream
        self._file_end = 0.0  # where the last packet of any stream ends, in seconds from 0 (see _cut_short)
        # Every stream (FFmpeg reads their packets anyway): a cut download ends them all early, while a
        # file whose audio outlasts its video does not.
        for packet in self._container.demux():
            if packet.size == 0:
                continue
            if packet.pts is not None and packet.time_base is not None:
                end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                self._file_end = max(self._file_end, end)
            if packet.stream.index != video.index or getattr(packet, "is_discard", False):
                continue
            count += 1
            if packet.pts is None:
                complete = False
            else:
                pts.append(packet.pts)
        self._rewind()
        return count, sorted(pts) if complete else None

    def _table_rate(self, header_fps: float) -> float:
        """The average rate of a variable-rate stream's frames, from their own timestamps (first to last,
        plus one typical frame), not from a container duration that FFmpeg may only have estimated."""
        pts = self._pts_table
        span = (pts[-1] - pts[0] + _median_step(pts)) * float(self._stream.time_base)
        return len(pts) / span if span > 0 else header_fps

    def _cut_short(self, pts: list[int], duration: float) -> bool:
        """Whether the file's packets (of every stream) end well before the header's duration: a cut download.

        Matroska's duration runs from time 0, other containers' from the stream's start, so the end is
        taken from 0 (the later of the two), and a stream that starts late is not taken for a cut one.
        """
        time_base = float(self._stream.time_base)
        step = _median_step(pts) * time_base
        covered = max(max(pts[-1], pts[-1] - self._start_pts) * time_base + step, self._file_end)
        return covered + max(2 * step, 0.1) < duration

    def frame_times(self) -> list[float] | None:
        """Each frame's time in seconds from the first, from the timestamp table of a variable-rate stream."""
        if self._pts_table is None:
            return None
        time_base, first = float(self._stream.time_base), self._pts_table[0]
        return [(pts - first) * time_base for pts in self._pts_table]

    def _use_pts_table(self, pts: list[int]) -> None:
        self._pts_table = pts
        self._pts_index = {value: i for i, value in enumerate(pts)}

    def _index(self, pts: int) -> int:
        if self._pts_table is not None:
            index = self._pts_index.get(pts)
            if index is None:  # a frame whose pts its packet did not have: the frame shown at that time
                index = max(bisect.bisect_right(self._pts_table, pts) - 1, 0)
            return index
        # Float arithmetic: Fraction time bases cost microseconds per call, and this runs per packet and frame.
        return round((pts - self._start_pts) * self._frames_per_tick)

    def _seek(self, first_index: int) -> None:
        stream = self._stream
        if self._pts_table is not None:
            target = self._pts_table[min(first_index, len(self._pts_table) - 1)]
        else:
            target = self._start_pts + int(first_index / self.info.fps / stream.time_base)
        self._container.seek(target, stream=stream, backward=True, any_frame=False)
        stream.codec_context.flush_buffers()
        self._fresh = False

    def _packets(self, wanted: list[int]) -> tuple[list, bool, bool]:
        """Packets from the keyframe at or before ``wanted[0]`` to a little past ``wanted[-1]`` (see _demux)."""
        if not (self._fresh and wanted[0] == 0):
            self._seek(wanted[0])
            packets, timed, at_end = self._demux(wanted[-1])
            while packets and not packets[0].is_keyframe:  # some demuxers land between keyframes
                packets.pop(0)
            if packets and (packets[0].pts is None or self._index(packets[0].pts) <= wanted[0]):
                return packets, timed, at_end
            # The seek landed after the frame we need (bad index, imprecise MPEG-TS seek): start over.
            self._rewind()
        self._fresh = False
        return self._demux(wanted[-1])

    def _demux(self, last_wanted: int) -> tuple[list, bool, bool]:
        """Packets from the current position to a little past ``last_wanted``.

        Returns the packets, whether they all have a pts, and whether the stream ended among them.
        """
        packets = []
        reached = None
        for packet in self._container.demux(self._stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            if packet.pts is None:
                return packets + [packet], False, False
            packets.append(packet)
            if reached is None and self._index(packet.pts) >= last_wanted:
                reached = len(packets)
            if reached is not None and len(packets) - reached >= _REORDER_WINDOW:
                return packets, True, False
        return packets, True, True

    def _decode(self, wanted: list[int], emit: Callable[[list[int], object], None]) -> tuple[int, int]:
        """Decode so that ``emit(indices, frame)`` receives, for every wanted index, the frame showing it.

        Returns (first index decoded, one past the last index seen): the caller pads or reports a shortfall.
        """
        packets, timed, at_end = self._packets(wanted)
        if not packets:
            return 0, 0
        if not timed:
            return self._decode_sequential(wanted, emit)
        shown = sorted(self._index(p.pts) for p in packets)
        # Each wanted index is shown by the first frame at or after it (covers gaps of variable-rate files).
        by_frame: dict[int, list[int]] = {}
        position = 0
        for index in wanted:
            while position < len(shown) and shown[position] < index:
                position += 1
            if position == len(shown):
                break
            by_frame.setdefault(shown[position], []).append(index)
        needed = set(by_frame)
        last_needed = max((n for n, p in enumerate(packets) if self._index(p.pts) in needed), default=-1)
        context = self._stream.codec_context
        last_seen = -1

        def take(frames) -> None:
            nonlocal last_seen
            for frame in frames:
                self.frames_decoded += 1
                if frame.pts is None:
                    continue
                index = self._index(frame.pts)
                last_seen = max(last_seen, index)
                if index in by_frame:
                    emit(by_frame.pop(index), frame)

        try:
            for packet in packets[: last_needed + 1]:
                if self._skip_nonref:
                    context.skip_frame = "DEFAULT" if self._index(packet.pts) in needed else "NONREF"
                take(context.decode(packet))
                if not by_frame:
                    break
            if by_frame:
                take(context.decode(None))  # drain the frames the decoder still holds
        finally:
            context.skip_frame = "DEFAULT"
        # A stream that ended before a wanted index has shown[-1] + 1 frames (reported or padded by the caller).
        return shown[0], max(last_seen, shown[-1] if at_end else -1) + 1

    def _decode_sequential(self, wanted: list[int], emit: Callable[[list[int], object], None]) -> tuple[int, int]:
        """Fallback for streams with missing timestamps: decode from the start, frames counted in order."""
        self._rewind()
        self._fresh = False
        position = 0
        index = -1
        for frame in self._container.decode(self._stream):
            self.frames_decoded += 1
            index = self._index(frame.pts) if frame.pts is not None else index + 1
            covered = []
            while position < len(wanted) and wanted[position] <= index:
                covered.append(wanted[position])
                position += 1
            if covered:
                emit(covered, frame)
            if position == len(wanted):
                break
        return 0, index + 1

    def _run(self, wanted: list[int], emit: Callable[[list[int], object], None]) -> int:
        try:
            _, decoded_until = self._decode(wanted, emit)
        except VideoDecodeError:
            raise
        except Exception as error:
            raise VideoDecodeError(self.path, f"decoding failed: {_short(error)}") from error
        return decoded_until

    def _to_rgb(self, frame, size: Size | None) -> np.ndarray:
        """RGB array of ``frame`` (scaled to ``size`` by libswscale when given).

        A reformatter keeps its swscale context while the frame format and sizes stay the same; building
        one costs more than converting a frame, so each thread keeps one per output size across files.
        """
        cache = _reformatters()
        reformatter = cache.get(size)
        if reformatter is None:
            from av.video.reformatter import VideoReformatter

            if len(cache) >= _MAX_REFORMATTERS:
                cache.clear()
            reformatter = cache[size] = VideoReformatter()
        global _REFORMAT_TAKES_THREADS
        options = {"format": "rgb24", "interpolation": "BILINEAR"}
        if size is not None:
            options.update(width=size[1], height=size[0])
        if _REFORMAT_TAKES_THREADS:
            # PyAV >= 17 would otherwise start a swscale thread pool per context, sized to the machine.
            try:
                return reformatter.reformat(frame, threads=self._threads, **options).to_ndarray()
            except TypeError:  # PyAV < 17: no threads argument, and single-threaded scaling
                _REFORMAT_TAKES_THREADS = False
        return reformatter.reformat(frame, **options).to_ndarray()

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        if len(indices) == 0:
            raise ValueError("indices must not be empty")
        return self.get_clips([indices])[0]

    def get_clips(
        self, clips: Sequence[Sequence[int]], sizes: Sequence[Size | None] | None = None
    ) -> list[torch.Tensor]:
        clips, sizes = _check_clips(clips, sizes)
        num_frames = self.info.num_frames
        clips = [_clamp(clip, num_frames) for clip in clips]
        # Which sizes each frame index is needed at; every (index, size) pair is converted once.
        wanted_sizes: dict[int, set[Size | None]] = {}
        for clip, size in zip(clips, sizes):
            for index in clip:
                wanted_sizes.setdefault(index, set()).add(size)
        wanted = sorted(wanted_sizes)
        found: dict[int, dict[Size | None, np.ndarray]] = {}

        # Sizes that libswscale produces while converting; the others are converted at the stored size.
        scaled = {size for size in sizes if size is not None} if self.decode_time_resize else set()

        def emit(indices: list[int], frame) -> None:
            images: dict[Size | None, np.ndarray] = {}
            for index in indices:
                for size in wanted_sizes[index]:
                    key = size if size in scaled else None
                    if key not in images:
                        images[key] = self._to_rgb(frame, key)
                found[index] = images

        decoded_until = self._run(wanted, emit)
        _fill_tail(self.path, found, wanted, decoded_until, num_frames)
        out = []
        for clip, size in zip(clips, sizes):
            key = size if size in scaled else None
            out.append(_resize_thwc(torch.from_numpy(np.stack([found[i][key] for i in clip])), size))
        return out

    def close(self) -> None:
        self._container.close()


# --------------------------------------------------------------------------------------------- decord
class _DecordReader(VideoReader):
    """decord reader: random access by frame index, one batched ``get_batch`` per read."""

    name = "decord"

    def __init__(self, path: str, threads: int = 1) -> None:
        import decord

        self.path = path
        _refuse_mpeg_streams(path, "decord", program_streams=False)
        try:
            self._reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=max(threads, 1))
            num_frames = len(self._reader)
            fps = float(self._reader.get_avg_fps())
        except Exception as error:  # decord raises DECORDError or RuntimeError
            raise VideoDecodeError(path, _open_failure(path, error)) from error
        if num_frames <= 0 or fps <= 0:
            raise VideoDecodeError(path, "no frames")
        height, width = self._frame_size(path)
        self.info = VideoInfo(path, num_frames, fps, num_frames / fps, height, width)

    def _frame_size(self, path: str) -> tuple[int, int]:
        """(height, width) from the container header; decord has no accessor short of decoding a frame."""
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
        try:
            frames = self._reader.get_batch(_clamp(indices, self.info.num_frames)).asnumpy()
        except Exception as error:
            reason = f"decoding failed: {_short(error)}"
            if "size must exactly match" in str(error):
                # decord sizes its output by the display rotation but does not rotate the pixels.
                reason = ("decord cannot read this video (its frame buffer size does not match: rotation metadata, "
                          f"or decord's bug with some frame sizes such as 48x48), use decoder='pyav'; {reason}")
            raise VideoDecodeError(self.path, reason) from error
        return torch.from_numpy(np.ascontiguousarray(frames))

    def close(self) -> None:
        del self._reader


# --------------------------------------------------------------------------------------------- torchcodec
class _TorchCodecReader(VideoReader):
    """torchcodec reader (CPU or CUDA): random access through ``VideoDecoder.get_frames_at``."""

    name = "torchcodec"

    def __init__(self, path: str, threads: int = 1, device: str = "cpu") -> None:
        from torchcodec.decoders import VideoDecoder

        self.path = path
        _refuse_mpeg_streams(path, "torchcodec", program_streams=True)
        try:
            # "approximate" trusts the header instead of scanning the whole file at open time; a header
            # without a frame count (Matroska, MPEG streams) gets the exact scan, as its estimate can be far off.
            self._decoder = VideoDecoder(
                path, seek_mode="approximate", dimension_order="NHWC", num_ffmpeg_threads=max(threads, 1),
                device=device,
            )
            meta = self._decoder.metadata
            if meta.num_frames_from_header is None:
                self._decoder = VideoDecoder(
                    path, seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=max(threads, 1),
                    device=device,
                )
                meta = self._decoder.metadata
        except Exception as error:
            raise VideoDecodeError(path, _open_failure(path, error)) from error
        num_frames = int(meta.num_frames or 0)
        fps = float(meta.average_fps or 0.0)
        if num_frames <= 0 or fps <= 0:
            raise VideoDecodeError(path, "no frames (header has no frame count, rate or duration)")
        duration = float(meta.duration_seconds or num_frames / fps)
        self.info = VideoInfo(path, num_frames, fps, duration, int(meta.height), int(meta.width))

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        if len(indices) == 0:
            raise ValueError("indices must not be empty")
        clamped = _clamp(indices, self.info.num_frames)
        wanted = sorted(set(clamped))
        found: dict[int, torch.Tensor] = {}
        try:
            batch = self._decoder.get_frames_at(wanted).data
            found = dict(zip(wanted, batch))
        except Exception as error:
            # Past the real end of a stream whose header overstates its length: keep what decodes.
            found = self._decode_each(wanted, error)
        _fill_tail(self.path, found, wanted, max(found, default=-1) + 1, self.info.num_frames)
        return torch.stack([found[i] for i in clamped]).cpu()

    def _decode_each(self, wanted: list[int], first_error: Exception) -> dict[int, torch.Tensor]:
        found: dict[int, torch.Tensor] = {}
        for index in wanted:
            try:
                found[index] = self._decoder.get_frame_at(index).data
            except Exception:
                break
        if not found:
            raise VideoDecodeError(self.path, f"decoding failed: {_short(first_error)}") from first_error
        return found

    def close(self) -> None:
        del self._decoder


@functools.lru_cache(maxsize=1)
def _torchcodec_load_error() -> str | None:
    """Why torchcodec cannot be used here (None when it loads and decodes)."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401 - loads the FFmpeg-linked core library
    except Exception as error:  # ImportError, OSError or RuntimeError when no FFmpeg libraries are found
        return f"{type(error).__name__}: {_short(error)}"
    return None


def _torchcodec_error() -> None:
    reason = _torchcodec_load_error()
    if reason is not None:
        raise ValueError(
            "decoder='torchcodec' needs the torchcodec package and the system FFmpeg libraries "
            f"(pip install 'oct3d[torchcodec]'; apt-get install ffmpeg); it failed to load: {reason}"
        )


_BACKENDS: dict[str, type[VideoReader]] = {
    "pyav": _PyAVReader,
    "decord": _DecordReader,
    "torchcodec": _TorchCodecReader,
}


def decoder_available(name: str) -> bool:
    """Whether backend ``name`` can be used on this machine (installed, and its libraries load)."""
    if name not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS} or 'auto', got {name!r}")
    if name == "pyav":
        return True
    if name == "decord":
        try:
            import decord  # noqa: F401
        except ImportError:
            return False
        return True
    return _torchcodec_load_error() is None


def available_decoders() -> tuple[str, ...]:
    """The backends that can be used here, in :data:`DECODERS` order."""
    return tuple(name for name in DECODERS if decoder_available(name))


def resolve_decoder(name: str) -> str:
    """The backend ``name`` stands for: itself, or for ``"auto"`` the first available one of :data:`AUTO_ORDER`.

    Raises:
        ValueError: unknown name.
    """
    if name == "auto":
        return next(backend for backend in AUTO_ORDER if decoder_available(backend))
    if name not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS} or 'auto', got {name!r}")
    return name


def require_decoder(name: str) -> str:
    """:func:`resolve_decoder`, and a clear ``ValueError`` saying what to install when the backend cannot load."""
    backend = resolve_decoder(name)
    if backend == "torchcodec":
        _torchcodec_error()
    elif not decoder_available(backend):
        raise ValueError(f"decoder={name!r} needs the {backend} package (pip install {backend})")
    return backend


def open_reader(
    path: str | os.PathLike, decoder: str = "pyav", threads: int = 1, decode_time_resize: bool = False
) -> VideoReader:
    """Open ``path`` with backend ``decoder`` (a name of :data:`DECODERS` or ``"auto"``).

    Args:
        path: video file.
        decoder: backend name.
        threads: decoding threads inside this reader (1 in DataLoader workers that each own one core).
        decode_time_resize: PyAV only: :meth:`VideoReader.get_clips` scales in libswscale while converting
            to RGB instead of resizing with torch afterwards (the other backends always use torch).

    Raises:
        VideoDecodeError: the file is missing, empty, not a video, or its header is unreadable.
        ValueError: unknown decoder, a backend that cannot load here, or ``threads < 1``.
    """
    backend = require_decoder(decoder)
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    path = os.fspath(path)
    _check_exists(path)
    if backend == "pyav":
        return _PyAVReader(path, threads=threads, decode_time_resize=decode_time_resize)
    return _BACKENDS[backend](path, threads=threads)
