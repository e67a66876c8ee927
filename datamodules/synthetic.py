"""A synthetic Kinetics-format dataset whose classes only motion tells apart.

Every video shows a random, periodic, colored texture (band-limited noise with random colors)
seen through a moving "camera". The class is the camera motion: moving left/right/up/down,
rotating clockwise/counterclockwise, zooming in/out. Start position, speed, colors and texture are
random per video and the appearance statistics are the same in every class (the zoom classes
cover the same magnification range in both directions), so no single frame reveals the class:
a model has to use time.

The output is the official Kinetics layout, written as real H.264 mp4 files::

    OUT/annotations/{train,val,test}.csv   label,youtube_id,time_start,time_end,split
    OUT/{train,val,test}/<label>/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4

Command line: ``python tools/make_synthetic_kinetics.py OUT [--classes N ...]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "MOTION_CLASSES",
    "SyntheticSummary",
    "main",
    "make_synthetic_kinetics",
    "render_motion_video",
    "write_mp4",
    "write_video",
]

# Ordered so that the first four (the default) are the plainest motions: translations.
MOTION_CLASSES = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "rotating clockwise",
    "rotating counterclockwise",
    "zooming in",
    "zooming out",
)
SPLITS = ("train", "val", "test")
_TEXTURE_SIZE = 128  # period of the texture in texture pixels; larger than any frame so no repeat is visible
#: Codec :func:`write_video` uses for each container extension when none is given.
DEFAULT_CODECS = {
    ".mp4": "libx264", ".m4v": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9",
    ".avi": "mpeg4", ".mpg": "mpeg2video", ".mpeg": "mpeg1video", ".ts": "libx264", ".m2ts": "libx264",
    ".mts": "libx264", ".wmv": "wmv2", ".flv": "flv", ".3gp": "libx264", ".ogv": "libvpx",
}
# Muxer names for extensions FFmpeg does not guess from the file name (or guesses differently).
_CONTAINER_FORMATS = {".m2ts": "mpegts", ".mts": "mpegts", ".mpg": "mpeg", ".mpeg": "mpeg", ".ogv": "ogg"}
# Pixel formats of encoders that do not take yuv420p.
_PIXEL_FORMATS = {"mjpeg": "yuvj420p", "prores": "yuv422p10le", "prores_ks": "yuv422p10le", "dnxhd": "yuv422p"}
_YOUTUBE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@dataclass(frozen=True)
class SyntheticSummary:
    """What :func:`make_synthetic_kinetics` wrote.

    Attributes:
        root: dataset root.
        class_names: labels, in class-index order (sorted, as data modules read them).
        videos_per_split: number of videos in each split.
        total_bytes: size of all mp4 files.
        seconds: generation wall time.
    """

    root: str
    class_names: tuple[str, ...]
    videos_per_split: dict[str, int]
    total_bytes: int
    seconds: float


def _periodic_texture(rng: np.random.Generator, size: int = _TEXTURE_SIZE) -> np.ndarray:
    """A random periodic color texture (size, size, 3) in [0, 255], band-limited noise with random colors."""
    frequencies = np.fft.fftfreq(size) * size
    radius = np.sqrt(frequencies[:, None] ** 2 + frequencies[None, :] ** 2)
    # Keep 2-20 cycles per period: coarse enough to survive H.264, fine enough to show motion clearly.
    amplitude = np.where((radius >= 2) & (radius <= 20), 1.0 / np.maximum(radius, 1.0) ** 0.8, 0.0)
    fields = []
    for _ in range(3):
        spectrum = amplitude * np.exp(2j * np.pi * rng.random((size, size)))
        field = np.real(np.fft.ifft2(spectrum))
        fields.append((field - field.mean()) / (field.std() + 1e-8))
    noise = np.stack(fields, axis=-1)  # (size, size, 3), unit variance per channel
    color_mix = rng.normal(0.0, 1.0, (3, 3))
    color_mix /= np.linalg.norm(color_mix, axis=0, keepdims=True)
    base_color = rng.uniform(70, 185, 3)
    contrast = rng.uniform(40, 60)
    return np.clip(base_color + contrast * noise @ color_mix, 0, 255).astype(np.float32)


def _sample_wrapped(texture: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear sampling of a periodic texture at float coordinates (wrap-around)."""
    size = texture.shape[0]
    y0 = np.floor(ys)
    x0 = np.floor(xs)
    wy = (ys - y0)[..., None]
    wx = (xs - x0)[..., None]
    y0 = y0.astype(np.int64) % size
    x0 = x0.astype(np.int64) % size
    y1 = (y0 + 1) % size
    x1 = (x0 + 1) % size
    top = texture[y0, x0] * (1 - wx) + texture[y0, x1] * wx
    bottom = texture[y1, x0] * (1 - wx) + texture[y1, x1] * wx
    return top * (1 - wy) + bottom * wy


def render_motion_video(label: str, rng: np.random.Generator, frames: int = 32, size: int = 64) -> np.ndarray:
    """Render one video of the motion class ``label``.

    Args:
        label: one of :data:`MOTION_CLASSES`.
        rng: source of every random choice (texture, colors, start, speed).
        frames: number of frames.
        size: frame height and width in pixels.

    Returns:
        uint8 array (frames, size, size, 3).
    """
    if label not in MOTION_CLASSES:
        raise ValueError(f"label must be one of {MOTION_CLASSES}, got {label!r}")
    texture = _periodic_texture(rng)
    center = (size - 1) / 2
    grid_y, grid_x = np.mgrid[0:size, 0:size].astype(np.float64)
    offset_y, offset_x = grid_y - center, grid_x - center
    start_y, start_x = rng.uniform(0, _TEXTURE_SIZE, 2)
    base_angle = rng.uniform(0, 2 * math.pi)
    speed = rng.uniform(1.5, 3.0)  # pixels per frame on screen
    angular_speed = math.radians(rng.uniform(3.0, 6.0))  # radians per frame
    zoom_per_frame = rng.uniform(1.015, 1.03)
    # Zoom classes share one magnification range: "in" goes low -> high, "out" high -> low.
    low_magnification = rng.uniform(0.8, 1.1)
    high_magnification = low_magnification * zoom_per_frame ** (frames - 1)

    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        shift_x = shift_y = 0.0
        angle = base_angle
        magnification = 1.0
        if label == "moving left":  # the content moves left on screen: the camera pans right
            shift_x = speed * t
        elif label == "moving right":
            shift_x = -speed * t
        elif label == "moving up":
            shift_y = speed * t
        elif label == "moving down":
            shift_y = -speed * t
        elif label == "rotating clockwise":
            # Content turns by -angle on screen (y points down): a shrinking angle turns it clockwise.
            angle = base_angle - angular_speed * t
        elif label == "rotating counterclockwise":
            angle = base_angle + angular_speed * t
        elif label == "zooming in":
            magnification = low_magnification * zoom_per_frame**t
        else:  # zooming out
            magnification = high_magnification / zoom_per_frame**t
        # The shift is in screen pixels (applied before the texture's random rotation), so translations
        # move along the screen axes whatever the texture's orientation.
        screen_x, screen_y = offset_x + shift_x, offset_y + shift_y
        cos, sin = math.cos(angle) / magnification, math.sin(angle) / magnification
        texture_x = start_x + cos * screen_x - sin * screen_y
        texture_y = start_y + sin * screen_x + cos * screen_y
        video[t] = np.clip(_sample_wrapped(texture, texture_y, texture_x) + 0.5, 0, 255).astype(np.uint8)
    return video


def write_mp4(
    path: str | os.PathLike, video: np.ndarray, fps: int, crf: int = 20, keyframe_interval: int | None = None
) -> None:
    """Encode uint8 frames (T, H, W, 3) (H and W even) as an H.264 mp4 with PyAV.

    Args:
        path: output file.
        video: the frames.
        fps: frame rate.
        crf: x264 constant rate factor (lower is better quality).
        keyframe_interval: distance between keyframes (default: x264's, 250).
    """
    import av

    _frames, height, width, _ = video.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 (yuv420p) needs even frame sizes, got {height}x{width}")
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        # One thread keeps the bitstream identical across machines; files are tiny anyway.
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
        if keyframe_interval is not None:
            stream.options = {**stream.options, "g": str(keyframe_interval), "keyint_min": str(keyframe_interval)}
        for image in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _youtube_id(rng: np.random.Generator) -> str:
    return "".join(_YOUTUBE_ALPHABET[i] for i in rng.integers(0, len(_YOUTUBE_ALPHABET), 11))


def make_synthetic_kinetics(
    out: str | os.PathLike,
    num_classes: int = 4,
    train_per_class: int = 40,
    val_per_class: int = 10,
    test_per_class: int = 5,
    frames: int = 32,
    size: int = 64,
    fps: int = 8,
    seed: int = 0,
    overwrite: bool = False,
) -> SyntheticSummary:
    """Write a synthetic motion dataset in the official Kinetics layout (see the module docstring).

    Args:
        out: dataset root to create.
        num_classes: number of motion classes, 2 to 8 (the first ``num_classes`` of :data:`MOTION_CLASSES`).
        train_per_class: training videos per class.
        val_per_class: validation videos per class.
        test_per_class: test videos per class (0 skips the split).
        frames: frames per video.
        size: frame height and width (even).
        fps: frame rate written in the files.
        seed: everything is a deterministic function of the seed.
        overwrite: replace an existing dataset at ``out``.

    Returns:
        a :class:`SyntheticSummary`.

    Raises:
        FileExistsError: ``out`` already holds a dataset and ``overwrite`` is False.
    """
    if not 2 <= num_classes <= len(MOTION_CLASSES):
        raise ValueError(f"num_classes must be in [2, {len(MOTION_CLASSES)}], got {num_classes}")
    for name, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if test_per_class < 0:
        raise ValueError(f"test_per_class must be >= 0, got {test_per_class}")
    if frames < 2:
        raise ValueError(f"frames must be >= 2 (motion needs two frames), got {frames}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16, got {size}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    root = Path(out)
    if (root / "annotations").exists():
        if not overwrite:
            raise FileExistsError(f"{root} already holds a dataset (annotations/ exists); pass overwrite=True "
                                  "(--overwrite on the command line)")
        for split in (*SPLITS, "annotations"):
            shutil.rmtree(root / split, ignore_errors=True)
    started = time.perf_counter()
    class_names = MOTION_CLASSES[:num_classes]
    per_class = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    clip_seconds = math.ceil(frames / fps)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    used_ids: set[str] = set()
    counts: dict[str, int] = {}
    total_bytes = 0
    for split_number, split in enumerate(SPLITS):
        if per_class[split] == 0:
            continue
        rows = []
        for class_number, label in enumerate(class_names):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for video_number in range(per_class[split]):
                # One generator per video: the dataset is the same whatever the order of generation.
                rng = np.random.default_rng([seed, split_number, class_number, video_number])
                youtube_id = _youtube_id(rng)
                while youtube_id in used_ids:
                    youtube_id = _youtube_id(rng)
                used_ids.add(youtube_id)
                time_start = int(rng.integers(0, 300))
                time_end = time_start + clip_seconds
                path = root / split / label / f"{youtube_id}_{time_start:06d}_{time_end:06d}.mp4"
                write_mp4(path, render_motion_video(label, rng, frames, size), fps)
                total_bytes += path.stat().st_size
                rows.append((label, youtube_id, time_start, time_end, split))
        with open(root / "annotations" / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            writer.writerows(rows)
        counts[split] = len(rows)
    summary = SyntheticSummary(
        str(root), tuple(sorted(class_names)), counts, total_bytes, round(time.perf_counter() - started, 3)
    )
    settings = dict(num_classes=num_classes, frames=frames, size=size, fps=fps, seed=seed, per_class=per_class)
    with open(root / "synthetic.json", "w") as handle:
        json.dump({"settings": settings, "summary": asdict(summary)}, handle, indent=2)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: ``python tools/make_synthetic_kinetics.py OUT [options]``."""
    parser = argparse.ArgumentParser(
        description="Write a synthetic Kinetics-layout dataset (H.264 mp4) whose classes only motion tells apart."
    )
    parser.add_argument("out", help="dataset root to create")
    parser.add_argument("--classes", type=int, default=4, help=f"number of motion classes, 2-{len(MOTION_CLASSES)}")
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--test-per-class", type=int, default=5)
    parser.add_argument("--frames", type=int, default=32, help="frames per video")
    parser.add_argument("--size", type=int, default=64, help="frame height and width in pixels (even)")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    args = parser.parse_args(argv)
    try:
        summary = make_synthetic_kinetics(
            args.out,
            num_classes=args.classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            test_per_class=args.test_per_class,
            frames=args.frames,
            size=args.size,
            fps=args.fps,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, NotADirectoryError) as error:
        message = str(error)
        # make_synthetic_kinetics names its parameters; the user typed the flags.
        for name, flag in (("num_classes", "--classes"), ("train_per_class", "--train-per-class"),
                           ("val_per_class", "--val-per-class"), ("test_per_class", "--test-per-class"),
                           ("frames", "--frames"), ("size", "--size"), ("fps", "--fps")):
            message = re.sub(rf"^{name}\b", flag, message, count=1)  # the leading name only, never a path
        if isinstance(error, NotADirectoryError):
            message = f"OUT must be a folder (or a path to create), got a file: {args.out}"
        parser.error(message)
    videos = ", ".join(f"{count} {split}" for split, count in summary.videos_per_split.items())
    print(
        f"wrote {summary.root}: {len(summary.class_names)} classes ({', '.join(summary.class_names)}), "
        f"{videos} videos, {summary.total_bytes / 1e6:.1f} MB in {summary.seconds:.1f} s"
    )
    return 0


def write_video(
    path: str | os.PathLike,
    video: np.ndarray,
    fps: int,
    codec: str | None = None,
    options: dict[str, str] | None = None,
    timestamps: list[float] | None = None,
    rotation: float | None = None,
    container_options: dict[str, str] | None = None,
) -> None:
    """Encode uint8 frames (T, H, W, 3) with PyAV in any container and codec it can write.

    Args:
        path: output file; its extension picks the container (and, without ``codec``, the codec from
            :data:`DEFAULT_CODECS`).
        video: the frames (H and W even for the 4:2:0 codecs).
        fps: nominal frame rate.
        codec: PyAV encoder name (``"libx264"``, ``"libx265"``, ``"mpeg4"``, ``"mjpeg"``, ``"libvpx-vp9"``...).
        options: encoder options (e.g. ``{"g": "250"}``).
        timestamps: presentation time of each frame in seconds, for variable-frame-rate files
            (default: frame ``i`` at ``i / fps``).
        rotation: display rotation in degrees written as container metadata (the pixels are unchanged).
        container_options: muxer options (e.g. ``{"movflags": "+faststart"}`` puts the MP4 index first).
    """
    import av

    path = os.fspath(path)
    suffix = Path(path).suffix.lower()
    codec = codec or DEFAULT_CODECS.get(suffix, "libx264")
    _frames, height, width, _ = video.shape
    if timestamps is not None and len(timestamps) != len(video):
        raise ValueError(f"timestamps must have one entry per frame ({len(video)}), got {len(timestamps)}")
    with av.open(path, mode="w", format=_CONTAINER_FORMATS.get(suffix), options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = width
        stream.height = height
        stream.pix_fmt = _PIXEL_FORMATS.get(codec, "yuv420p")
        stream.options = {"threads": "1", **(options or {})}
        if timestamps is not None:
            from fractions import Fraction

            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index, image in enumerate(video):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if timestamps is not None:
                frame.pts = round(timestamps[index] * 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
