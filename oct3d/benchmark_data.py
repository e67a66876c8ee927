"""Data-loading benchmark: training clips per second per worker, decode against transform time.

``python tools/benchmark_data.py FOLDER [--config configs/oct_i3d.yaml]`` (also ``oct3d bench-data``)
builds training loaders with the config's clip settings (frames, stride, short-side jitter, crop,
flip, decoder, ``clips_per_video``) over the videos in ``FOLDER`` (a Kinetics-layout or path-list root,
or any folder of videos) and times them **interleaved**, round-robin over the same videos, in this one
process on one core (``torch.set_num_threads(1)``, one decoding thread): that is one DataLoader worker.
It reports clips/s, milliseconds per clip spent decoding (open, demux, decode, RGB conversion) and
transforming (resize, crop, flip, normalize), and how many workers one GPU's training step needs:
``ceil(model clips/s / loader clips/s)``, from ``--model-clips-per-s`` or from the model step that
``--measure-model`` times on ``--device``.

Loaders (``--loaders``):

* ``plain``: a plain PyAV loop (the baseline of issue 14): open, decode from the first frame up to the
  clip's last frame converting every frame to RGB, then the same :class:`VideoTrainTransform`;
* ``plain:kept``: the same loop converting only the kept frames (what the data module did before
  multi-clip reads and frame skipping, on files with one keyframe per clip);
* ``pyav:K``, ``decord:K``, ``torchcodec:K``: :class:`datamodules.kinetics.VideoClipDataset` with that
  decoder and ``clips_per_video=K``; a ``:swscale`` suffix scales while decoding (``decode_time_resize``),
  ``:tN`` decodes with N threads (a worker that owns N cores; the per-worker figure then uses N cores).

``--generate N`` first writes N Kinetics-like videos into ``FOLDER`` with PyAV: 10 s at 30 fps, half
340x256 and half 640x360, H.264 with x264's defaults (one keyframe every 250 frames, B-frames).

``--test-views B [B ...]`` times the test protocol's loading instead (``test_clips x test_crops``
views of each video, 10 x 3 by default): every view of each drawn video is fetched through the test
dataset's batched fetch, ``B`` views per batch, as a DataLoader with ``eval_batch_size=B`` fetches them.
It reports the video opens, frames decoded and milliseconds per video for each ``B``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["LoaderResult", "TestViewResult", "benchmark_loaders", "benchmark_test_views", "format_table",
           "format_test_view_table", "main", "make_kinetics_like", "measure_model"]

_CLIP_KEYS = ("num_frames", "sampling_rate", "crop_size", "min_short_side", "max_short_side", "flip_prob",
              "mean", "std", "decoder", "clips_per_video", "batch_size", "target_fps", "test_clips", "test_crops")
_DEFAULT_CLIP = dict(num_frames=8, sampling_rate=8, crop_size=224, min_short_side=256, max_short_side=320,
                     flip_prob=0.5, decoder="pyav", clips_per_video=2, batch_size=8)


@dataclass
class LoaderResult:
    """Timings of one loader.

    Attributes:
        name: loader spec (``plain``, ``pyav:2``...).
        clips: training clips delivered.
        seconds: wall time spent in the loader.
        decode_s: of which decoding (open, demux, decode, RGB conversion).
        transform_s: of which transforming (resize, crop, flip, normalize).
    """

    name: str
    clips: int
    seconds: float
    decode_s: float
    transform_s: float

    @property
    def clips_per_s(self) -> float:
        """Training clips per second of this single-core loader (one worker)."""
        return self.clips / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------- videos
def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth color noise with fine grain: compresses like camera footage rather than like flat synthetic art."""
    from torch.nn.functional import interpolate

    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, height // 16 + 2, width // 16 + 2)).astype(np.float32))
    smooth = interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    grain = rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    return np.clip(smooth.numpy() + grain, 0, 255).astype(np.uint8)


def make_kinetics_like(
    folder: str | os.PathLike, count: int, seconds: int = 10, fps: int = 30, seed: int = 0
) -> list[Path]:
    """Write ``count`` Kinetics-like H.264 mp4 files (half 340x256, half 640x360) with x264's default GOP.

    The camera pans across a large textured scene and a block moves over it, so that the encoder
    produces the usual I/P/B structure and bit rates of real clips (a few hundred kbit/s).
    """
    import av

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        width, height = (340, 256) if index % 2 == 0 else (640, 360)
        path = folder / f"kinetics_like_{index:03d}_{width}x{height}.mp4"
        paths.append(path)
        if path.is_file():
            continue
        scene = _texture(rng, height * 2, width * 2)
        frames = seconds * fps
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"threads": "1"}  # x264 defaults otherwise: keyint 250, 3 B-frames, preset medium
            for t in range(frames):
                top = int(height / 2 + height / 3 * math.sin(t / 40 + index))
                left = int(t * width / frames)
                image = scene[top : top + height, left : left + width].copy()
                x = (t * 7 + 31 * index) % (width - 40)
                image[40:80, x : x + 40] = (255 * (t // 30 % 2), 80, 200)
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return paths


def _find_samples(root: Path, clip: dict[str, Any]) -> list:
    """Training samples of a Kinetics/list root, or every video of a plain folder (label 0)."""
    from datamodules.kinetics import KineticsDataModule, VideoSample, find_annotation_format
    from datamodules.video import find_videos

    try:
        find_annotation_format(root)
    except FileNotFoundError:
        return [VideoSample(str(path), 0) for path in find_videos([root])]
    module = KineticsDataModule(str(root), num_workers=0, **{k: clip[k] for k in _CLIP_KEYS if k in clip})
    return module.samples("train")


# --------------------------------------------------------------------------------------------- loaders
def _one_thread() -> dict[str, int]:
    """``to_ndarray`` keyword for single-threaded swscale: PyAV >= 17 otherwise starts a thread pool for
    every frame (about 3 ms a frame here, and more than the one core this benchmark measures)."""
    import av

    return {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}


_ONE_THREAD = _one_thread()


class _PlainPyAV:
    """The baseline: decode from the start up to the clip, converting every (or every kept) frame, then transform."""

    def __init__(self, samples: list, transform, num_frames: int, sampling_rate: int, convert_all: bool,
                 target_fps: float | None = None) -> None:
        self.samples, self.transform, self.convert_all = samples, transform, convert_all
        self.num_frames, self.sampling_rate, self.target_fps = num_frames, sampling_rate, target_fps
        self.timing = {"decode_s": 0.0, "transform_s": 0.0, "clips": 0}
        self.clips_per_video = 1
        self.frame_counts: dict[int, int] = {}  # from draw_readable's probe, for headers without a frame count

    def __getitem__(self, index: int) -> torch.Tensor:
        import av

        from datamodules.video import clip_indices, clip_span, source_step

        started = time.perf_counter()
        sample = self.samples[index]
        with av.open(sample.path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            # Matroska/WebM headers carry no frame count: take the one the data modules' reader found.
            total = stream.frames or self.frame_counts.get(index, 0)
            step = source_step(self.sampling_rate, float(stream.average_rate or 0), self.target_fps)
            start = int(torch.randint(0, max(total - clip_span(self.num_frames, step), 0) + 1, ()).item())
            wanted = clip_indices(total, start, self.num_frames, step)
            kept = {}
            image = None
            try:
                for position, frame in enumerate(container.decode(stream)):
                    if self.convert_all or position in wanted:
                        image = frame.to_ndarray(format="rgb24", **_ONE_THREAD)
                    if position in wanted:
                        kept[position] = image
                    if position >= wanted[-1]:
                        break
            except av.error.FFmpegError:
                if image is None:
                    raise
                # A truncated file: its last decodable frame stands in for the rest, as the readers do.
        if image is None:
            raise ValueError(f"{sample.path}: no frame decoded")
        frames = torch.from_numpy(np.stack([kept.get(i, image) for i in wanted]))
        transforming = time.perf_counter()
        clip = self.transform(frames)
        self.timing["decode_s"] += transforming - started
        self.timing["transform_s"] += time.perf_counter() - transforming
        self.timing["clips"] += 1
        return clip


def _make_loader(spec: str, samples: list, clip: dict[str, Any]):
    from datamodules.kinetics import VideoClipDataset
    from datamodules.transforms import KINETICS_MEAN, KINETICS_STD, VideoTrainTransform

    transform = VideoTrainTransform(
        clip["num_frames"], clip["crop_size"], clip["min_short_side"], clip["max_short_side"], clip["flip_prob"],
        mean=clip.get("mean", KINETICS_MEAN), std=clip.get("std", KINETICS_STD),
    )
    if spec in ("plain", "plain:kept"):
        return _PlainPyAV(samples, transform, clip["num_frames"], clip["sampling_rate"], convert_all=spec == "plain",
                          target_fps=clip.get("target_fps"))
    decoder, _, rest = spec.partition(":")
    parts = rest.split(":")
    options = set(parts[1:])
    threads = [int(o[1:]) for o in options if o[:1] == "t" and o[1:].isdigit()]
    if not parts[0].isdigit() or options - {"swscale"} - {f"t{t}" for t in threads} or len(threads) > 1:
        raise ValueError(f"loader must be 'plain' or DECODER:K[:swscale][:tN] (e.g. pyav:2, pyav:2:t2), got {spec!r}")
    return VideoClipDataset(
        samples, "train", transform, clip["num_frames"], clip["sampling_rate"], decoder=decoder,
        clips_per_video=int(parts[0]), decode_time_resize="swscale" in options,
        decoder_threads=threads[0] if threads else 1, target_fps=clip.get("target_fps"),
    )


def draw_readable(samples: list, videos: int, seed: int = 0) -> tuple[list[int], dict[int, int], list[str]]:
    """``videos`` sample indices to read (with repeats when there are fewer readable videos), drawn from
    the videos the data modules' PyAV reader can open; their frame counts; and ``"path: reason"`` for
    each unreadable one met on the way (missing, empty, not a video, no video stream).

    Only as many videos are opened as the draw needs, so a large dataset is not probed whole.
    """
    from datamodules.decoders import VideoDecodeError, open_reader

    rng = random.Random(seed)
    candidates = list(range(len(samples)))
    rng.shuffle(candidates)
    counts: dict[int, int] = {}
    skipped: list[str] = []
    for index in candidates:
        if len(counts) >= videos:
            break
        try:
            with open_reader(samples[index].path, "pyav") as reader:
                frames = reader.info.num_frames
        except VideoDecodeError as error:
            skipped.append(str(error))  # names the file
            continue
        if frames < 1:
            skipped.append(f"{samples[index].path}: no frames")
            continue
        counts[index] = frames
    readable = sorted(counts)
    order = rng.choices(readable, k=videos) if readable else []
    return order, counts, skipped


def _draw(samples: list, videos: int, seed: int, skipped: list[str] | None) -> tuple[list[int], dict[int, int]]:
    """:func:`draw_readable`'s draw and frame counts; the unreadable videos go to ``skipped``; none readable raises."""
    if not samples:
        raise ValueError("no videos to benchmark")
    order, counts, unreadable = draw_readable(samples, videos, seed)
    if skipped is not None:
        skipped.extend(unreadable)
    if not order:
        raise ValueError("no readable videos to benchmark")
    return order, counts


def benchmark_loaders(samples: list, loaders: Sequence[str], clip: dict[str, Any], videos: int = 24,
                      rounds: int = 4, seed: int = 0, skipped: list[str] | None = None) -> list[LoaderResult]:
    """Time each loader over the same ``videos`` videos, interleaved: every round, each loader reads a share.

    The videos are drawn from the readable ones (:func:`draw_readable`); the unreadable ones met are
    appended to ``skipped`` when given. The loaders run in this process; call
    ``torch.set_num_threads(1)`` first to measure one worker.
    """
    order, counts = _draw(samples, videos, seed, skipped)
    built = {spec: _make_loader(spec, samples, clip) for spec in loaders}
    for loader in built.values():
        if isinstance(loader, _PlainPyAV):
            loader.frame_counts = counts
    chunks = [order[i::rounds] for i in range(rounds)]
    seconds = dict.fromkeys(loaders, 0.0)
    for loader in built.values():  # warm-up: codec libraries, allocator, caches
        loader[order[0]]
        loader.timing.update(decode_s=0.0, transform_s=0.0, clips=0)
    for round_index, chunk in enumerate(chunks):
        # Rotate who goes first, so a load change on the machine hits every loader alike.
        specs = list(loaders[round_index % len(loaders):]) + list(loaders[: round_index % len(loaders)])
        for spec in specs:
            torch.manual_seed(seed + round_index)
            started = time.perf_counter()
            for index in chunk:
                built[spec][index]
            seconds[spec] += time.perf_counter() - started
    return [
        LoaderResult(spec, int(built[spec].timing["clips"]), seconds[spec], built[spec].timing["decode_s"],
                     built[spec].timing["transform_s"])
        for spec in loaders
    ]


# --------------------------------------------------------------------------------------------- test views
@dataclass
class TestViewResult:
    """Test-protocol loading of one batch size.

    Attributes:
        views_per_batch: views fetched per batched fetch (a DataLoader's ``eval_batch_size``).
        videos: videos whose views were all fetched.
        views: views delivered.
        opens: video opens (decodes from a seek) this took.
        frames_decoded: frames decoded (PyAV counts what it decodes; other decoders what they return).
        seconds: wall time spent fetching.
    """

    __test__ = False  # (a name pytest would otherwise collect from a test module that imports it)

    views_per_batch: int
    videos: int
    views: int
    opens: int
    frames_decoded: int
    seconds: float

    @property
    def ms_per_video(self) -> float:
        """Milliseconds to load every view of one video."""
        return 1000 * self.seconds / max(self.videos, 1)


def benchmark_test_views(samples: list, batch_sizes: Sequence[int], clip: dict[str, Any], videos: int = 4,
                         rounds: int = 2, seed: int = 0, skipped: list[str] | None = None) -> list[TestViewResult]:
    """Time the test protocol's view loading for each batch size, interleaved over the same videos.

    Each batch size gets its own test-mode :class:`~datamodules.kinetics.VideoClipDataset` (the
    config's frames, stride, short side, crop, decoder, ``test_clips`` and ``test_crops``); the views of
    each drawn video are fetched in consecutive chunks of that size through ``__getitems__``, the
    DataLoader's batched fetch, so a chunk may span two videos exactly as a test batch does.
    """
    from datamodules.kinetics import VideoClipDataset
    from datamodules.transforms import KINETICS_MEAN, KINETICS_STD, VideoEvalTransform

    order, _ = _draw(samples, videos, seed, skipped)
    num_clips, num_crops = int(clip.get("test_clips", 10)), int(clip.get("test_crops", 3))
    views = num_clips * num_crops
    transform = VideoEvalTransform(clip["num_frames"], clip["crop_size"], clip["min_short_side"], num_crops,
                                   mean=clip.get("mean", KINETICS_MEAN), std=clip.get("std", KINETICS_STD))
    decoder = "pyav" if clip["decoder"] == "auto" else clip["decoder"]
    datasets = {
        size: VideoClipDataset(samples, "test", transform, clip["num_frames"], clip["sampling_rate"], num_clips,
                               num_crops, decoder=decoder, target_fps=clip.get("target_fps"))
        for size in batch_sizes
    }

    def fetch(size: int, video_indices: list[int]) -> None:
        indices = [video * views + view for video in video_indices for view in range(views)]
        for start in range(0, len(indices), size):
            datasets[size].__getitems__(indices[start:start + size])

    for size in batch_sizes:  # warm-up: codec libraries, allocator, caches
        fetch(size, order[:1])
        datasets[size].timing.update(decode_s=0.0, transform_s=0.0, clips=0, videos=0, frames_decoded=0)
    chunks = [order[i::rounds] for i in range(rounds)]
    seconds = dict.fromkeys(batch_sizes, 0.0)
    for round_index, chunk in enumerate(chunks):
        turn = round_index % len(batch_sizes)
        for size in list(batch_sizes[turn:]) + list(batch_sizes[:turn]):
            started = time.perf_counter()
            fetch(size, chunk)
            seconds[size] += time.perf_counter() - started
    return [
        TestViewResult(size, len(order), int(datasets[size].timing["clips"]), int(datasets[size].timing["videos"]),
                       int(datasets[size].timing["frames_decoded"]), seconds[size])
        for size in batch_sizes
    ]


def format_test_view_table(results: list[TestViewResult]) -> str:
    """Markdown table: per video, opens, frames decoded and milliseconds for each views-per-batch."""
    lines = ["| views per batch | opens per video | frames decoded per video | ms per video |", "|---|---|---|---|"]
    for r in results:
        per = max(r.videos, 1)
        lines.append(f"| {r.views_per_batch} | {r.opens / per:.1f} | {r.frames_decoded / per:.0f} | "
                     f"{r.ms_per_video:.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- model
def measure_model(config: dict[str, Any], batch: int, device: str = "auto", steps: int = 3) -> float:
    """Training clips/s of the config's model (forward, backward, SGD step) on ``device``, after one warm-up step."""
    from oct3d.inference import resolve_device
    from oct3d.models import get_model

    model_args = (config.get("model") or {}).get("init_args") or {}
    data_args = (config.get("data") or {}).get("init_args") or {}
    backbone = model_args.get("backbone", "oct_i3d_r50")
    model = get_model(backbone, num_classes=int(model_args.get("num_classes", 400)),
                      **(model_args.get("backbone_kwargs") or {}))
    dev = resolve_device(device)
    model.to(dev).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    crop, frames = int(data_args.get("crop_size", 224)), int(data_args.get("num_frames", 8))
    inputs = torch.randn(batch, 3, frames, crop, crop, device=dev)
    labels = torch.randint(0, int(model_args.get("num_classes", 400)), (batch,), device=dev)
    amp = dev.type == "cuda" and "16" in str((config.get("trainer") or {}).get("precision", ""))

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


# --------------------------------------------------------------------------------------------- report
def cpu_model_name() -> str:
    """The CPU's model name (``lscpu``'s "Model name", from /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def format_table(results: list[LoaderResult], model_clips_per_s: float | None = None) -> str:
    """Markdown table: clips/s per worker, decode and transform ms per clip, speed-up over ``plain``."""
    baseline = next((r.clips_per_s for r in results if r.name == "plain"), None)
    header = "| loader | clips/s per worker | decode ms/clip | transform ms/clip | vs plain |"
    if model_clips_per_s:
        header += f" workers for {model_clips_per_s:.3g} clips/s |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        per_clip = 1000 / max(r.clips, 1)
        ratio = f"{r.clips_per_s / baseline:.2f}x" if baseline else "-"
        row = (f"| {r.name} | {r.clips_per_s:.1f} | {r.decode_s * per_clip:.1f} | {r.transform_s * per_clip:.1f} "
               f"| {ratio} |")
        if model_clips_per_s:
            row += f" {math.ceil(model_clips_per_s / r.clips_per_s) if r.clips_per_s else '-'} |"
        lines.append(row)
    return "\n".join(lines)


def _read_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``tools/benchmark_data.py`` / ``oct3d bench-data``."""
    parser = argparse.ArgumentParser(prog="oct3d bench-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="Kinetics-layout or path-list root, or a folder of videos")
    parser.add_argument("--config", help="LightningCLI YAML whose data.init_args give the clip settings")
    parser.add_argument("--loaders", nargs="+",
                        help="loaders to compare (default: plain, plain:kept, pyav:1, the config's decoder:K, and "
                             "decord:K / torchcodec:K where available)")
    parser.add_argument("--clips-per-video", type=int, help="override the config's clips_per_video (default 2)")
    parser.add_argument("--videos", type=int, default=24, help="video reads per loader (default 24)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaving rounds (default 4)")
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="first write N Kinetics-like videos into FOLDER (10 s, 30 fps; alternately 340x256 and "
                             "640x360, the first 340x256)")
    parser.add_argument("--test-views", type=int, nargs="+", metavar="B",
                        help="time the test protocol's loading instead: every test view of each video, B views "
                             "per batched fetch (e.g. 1 8 30)")
    parser.add_argument("--model-clips-per-s", type=float, help="training clips/s of one GPU's step (given)")
    parser.add_argument("--measure-model", action="store_true",
                        help="measure the config's model training step on --device instead")
    parser.add_argument("--device", default="auto", help="device of --measure-model (auto, cpu, cuda)")
    parser.add_argument("--model-batch", type=int, help="batch of --measure-model (default: the training batch)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0 on success, 2 on usage errors."""
    from datamodules.decoders import available_decoders

    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("videos", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.test_views and min(args.test_views) < 1:
        parser.error(f"--test-views sizes must be >= 1, got {args.test_views}")
    if args.test_views and (args.loaders or args.measure_model or args.model_clips_per_s
                            or args.clips_per_video is not None):
        parser.error("--test-views times the test protocol's loading; it takes no --loaders, --clips-per-video "
                     "or model rate")
    config = _read_config(args.config)
    data_args = (config.get("data") or {}).get("init_args") or {}
    clip = {**_DEFAULT_CLIP, **{k: data_args[k] for k in _CLIP_KEYS if k in data_args}}
    if args.clips_per_video is not None:
        clip["clips_per_video"] = args.clips_per_video
    if args.generate:
        make_kinetics_like(args.folder, args.generate, seed=args.seed)
    root = Path(args.folder)
    if not root.is_dir():
        print(f"error: {root} is not a folder", file=sys.stderr)
        return 2
    samples = _find_samples(root, clip)
    if not samples:
        print(f"error: no videos under {root} (use --generate N to write Kinetics-like ones)", file=sys.stderr)
        return 2
    if args.test_views:
        return _main_test_views(args, samples, clip)
    k = int(clip["clips_per_video"])
    decoder = "pyav" if clip["decoder"] == "auto" else clip["decoder"]
    others = [f"{d}:{k}" for d in ("decord", "torchcodec") if d in available_decoders()]
    loaders = args.loaders or list(dict.fromkeys(["plain", "plain:kept", "pyav:1", f"{decoder}:{k}", *others]))
    torch.set_num_threads(1)  # one core: what one DataLoader worker has
    skipped: list[str] = []
    try:
        results = benchmark_loaders(samples, loaders, clip, args.videos, args.rounds, args.seed, skipped)
    except ValueError as error:
        print(f"error: {error} under {root}" if "readable" in str(error) else f"error: {error}", file=sys.stderr)
        return 2
    finally:
        _report_skipped(skipped)
    model_rate = args.model_clips_per_s
    model_note = "given" if model_rate else None
    if args.measure_model:
        batch = args.model_batch or int(clip["batch_size"]) * k
        torch.set_num_threads(os.cpu_count() or 1)
        model_rate = measure_model(config, batch, args.device)
        model_note = f"measured on {args.device}, batch {batch}"
    print(f"CPU: {cpu_model_name()}; one core per loader (torch threads 1, decoder threads 1); "
          f"{len(samples)} videos, {args.videos} reads per loader, {args.rounds} interleaved rounds")
    at_fps = f" at {clip['target_fps']:g} fps" if clip.get("target_fps") else ""
    print(f"clips: {clip['num_frames']} frames x stride {clip['sampling_rate']}{at_fps}, short side "
          f"{clip['min_short_side']}-{clip['max_short_side']}, crop {clip['crop_size']}, flip {clip['flip_prob']}")
    print(format_table(results, model_rate))
    if model_rate:
        print(f"model: {model_rate:.1f} training clips/s ({model_note}); "
              "workers = ceil(model clips/s / loader clips/s)")
    if args.json:
        payload = {"cpu": cpu_model_name(), "clip": clip, "model_clips_per_s": model_rate, "model": model_note,
                   "results": [{**asdict(r), "clips_per_s": r.clips_per_s} for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _report_skipped(skipped: list[str]) -> None:
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"skipped {len(skipped)} unreadable video(s): {shown}", file=sys.stderr)


def _main_test_views(args: argparse.Namespace, samples: list, clip: dict[str, Any]) -> int:
    torch.set_num_threads(1)  # one core: what one DataLoader worker has
    skipped: list[str] = []
    try:
        results = benchmark_test_views(samples, args.test_views, clip, args.videos, args.rounds, args.seed, skipped)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        _report_skipped(skipped)
    views = int(clip.get("test_clips", 10)) * int(clip.get("test_crops", 3))
    print(f"CPU: {cpu_model_name()}; one core (torch threads 1, decoder threads 1); {results[0].videos} video "
          f"reads per batch size, {args.rounds} interleaved rounds")
    print(f"test views: {clip.get('test_clips', 10)} clips x {clip.get('test_crops', 3)} crops = {views} per video, "
          f"{clip['num_frames']} frames x stride {clip['sampling_rate']}, short side {clip['min_short_side']}, "
          f"crop {clip['crop_size']}, decoder {clip['decoder']}")
    print(format_test_view_table(results))
    if args.json:
        payload = {"cpu": cpu_model_name(), "clip": clip,
                   "test_views": [{**asdict(r), "ms_per_video": r.ms_per_video} for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
