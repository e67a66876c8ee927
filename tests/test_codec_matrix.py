"""Every common container and codec, and the awkward files, through every decoder backend.

Files are tiny (64x48, 12 frames) and encoded here with PyAV. Each decoder must return the frames
(close to what was encoded, the same frames as the other decoders, the same when seeking) or raise a
clear VideoDecodeError; never hang or crash. Calls that could hang run under a timeout.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.decoders import DECODERS, decoder_available
from datamodules.synthetic import DEFAULT_CODECS, write_video
from datamodules.video import VIDEO_EXTENSIONS, VideoDecodeError, find_videos, open_video, probe, read_video

FRAMES, HEIGHT, WIDTH, FPS = 12, 48, 64, 24
# Lossy codecs at this size: mean absolute error per pixel value well under this.
MAX_ERROR = 12.0

# Codecs (with a container that holds them); HEVC, AV1 and the others only where this PyAV can encode them.
CODECS = [
    ("libx264", ".mp4"),
    ("libx265", ".mp4"),
    ("mpeg4", ".avi"),
    ("mpeg2video", ".mpg"),
    ("mpeg1video", ".mpeg"),
    ("mjpeg", ".mkv"),
    ("libvpx-vp9", ".webm"),
    ("libvpx", ".webm"),
    ("libsvtav1", ".mkv"),
    ("ffv1", ".mkv"),
    ("prores", ".mov"),
    ("wmv2", ".wmv"),
    ("flv", ".flv"),
    ("msmpeg4", ".avi"),
    ("mpeg2video", ".ts"),
]
# Backend limitations, checked to fail cleanly (a VideoDecodeError) rather than to decode: decord's bundled
# FFmpeg has no AV1 decoder and no Ogg demuxer; decord and torchcodec refuse MPEG transport streams (and
# torchcodec program streams), where they seek imprecisely (failing on B-frame H.264, or returning frames
# from the wrong place).
KNOWN_LIMITS = {
    ("decord", "libsvtav1", ".mkv"),
    ("decord", "libvpx", ".ogv"),
    ("torchcodec", "mpeg2video", ".mpg"),
    ("torchcodec", "mpeg1video", ".mpeg"),
    *((backend, codec, suffix) for backend in ("decord", "torchcodec") for codec in ("libx264", "mpeg2video")
      for suffix in (".ts", ".m2ts", ".mts")),
}


def _source(frames: int = FRAMES) -> np.ndarray:
    """A smooth moving color pattern (survives lossy codecs; every frame differs from its neighbours)."""
    t = np.arange(frames)[:, None, None]
    y = np.arange(HEIGHT)[None, :, None]
    x = np.arange(WIDTH)[None, None, :]
    shape = (frames, HEIGHT, WIDTH)
    channels = [(x * 3 + t * 9) % 256, (y * 4 + t * 5) % 256, (x + y) * 2 + 0 * t]
    return np.stack([np.broadcast_to(c, shape) for c in channels], -1).astype(np.uint8)


def _can_encode(codec: str) -> bool:
    from av.codec import Codec

    try:
        Codec(codec, "w")
    except Exception:
        return False
    return True


def _require(decoder: str) -> None:
    if not decoder_available(decoder):
        pytest.skip(f"{decoder} cannot load here (torchcodec needs the system FFmpeg libraries)")


def _within(seconds: float, function, *args):
    """Run ``function(*args)`` in a daemon thread; fail the test (instead of hanging) after ``seconds``."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(function, '__name__', function)} did not finish within {seconds} s (hang)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _error(frames: torch.Tensor, source: np.ndarray) -> float:
    return (frames.float() - torch.from_numpy(source[: len(frames)]).float()).abs().mean().item()


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """``encoded(codec, suffix)`` -> path of the tiny test video, written once per module."""
    folder = tmp_path_factory.mktemp("codecs")
    cache: dict[tuple[str, str], Path] = {}

    def make(codec: str, suffix: str) -> Path:
        if not _can_encode(codec):
            pytest.skip(f"this PyAV cannot encode {codec}")
        if (codec, suffix) not in cache:
            path = folder / f"{codec}{suffix}"
            write_video(path, _source(), FPS, codec)
            cache[codec, suffix] = path
        return cache[codec, suffix]

    return make


def _check_decodes(path: Path, decoder: str) -> torch.Tensor:
    info = _within(30, probe, path, decoder)
    assert (info.height, info.width) == (HEIGHT, WIDTH)
    assert abs(info.num_frames - FRAMES) <= 1, info
    frames = _within(30, lambda: read_video(path, decoder).frames)
    assert frames.shape == (info.num_frames, HEIGHT, WIDTH, 3) and frames.dtype == torch.uint8
    assert _error(frames, _source()) < MAX_ERROR
    with open_video(path, decoder) as reader:  # seeking gives the same frames as reading through
        assert torch.equal(_within(30, reader.get_frames, [7, 3, 7]), frames[[7, 3, 7]])
    return frames


def _check_case(path: Path, decoder: str, codec: str) -> torch.Tensor | None:
    if (decoder, codec, path.suffix) in KNOWN_LIMITS:
        with pytest.raises(VideoDecodeError):
            _within(30, lambda: read_video(path, decoder))
        return None
    return _check_decodes(path, decoder)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize(("codec", "suffix"), CODECS, ids=[f"{c}{s}" for c, s in CODECS])
def test_codec_matrix(encoded, decoder, codec, suffix):
    _require(decoder)
    path = encoded(codec, suffix)
    frames = _check_case(path, decoder, codec)
    if frames is not None and decoder != "pyav":
        # Same frames as PyAV (decoders are near bit-exact; FFmpeg versions may differ in IDCT rounding).
        reference = read_video(path, "pyav").frames
        assert (frames.float() - reference.float()).abs().mean() < 1.0


CONTAINERS = [(DEFAULT_CODECS[suffix], suffix) for suffix in VIDEO_EXTENSIONS]


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize(("codec", "suffix"), CONTAINERS, ids=[s for _, s in CONTAINERS])
def test_every_container_extension(encoded, decoder, codec, suffix):
    _require(decoder)
    _check_case(encoded(codec, suffix), decoder, codec)


def test_folder_scan_finds_every_extension(encoded, tmp_path):
    import shutil

    for codec, suffix in CONTAINERS:
        shutil.copy(encoded(codec, suffix), tmp_path / f"v{suffix.upper()}")  # upper case too
    (tmp_path / "notes.txt").write_text("ignored")
    found = find_videos([tmp_path])
    assert sorted(p.suffix.lower() for p in found) == sorted(VIDEO_EXTENSIONS)


# Awkward files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", DECODERS)
def test_variable_frame_rate(tmp_path, decoder):
    _require(decoder)
    times = [0.0, 0.04, 0.08, 0.2, 0.24, 0.28, 0.5, 0.54, 0.58, 0.62, 0.9, 0.94]  # gaps and bursts
    path = tmp_path / "vfr.mkv"
    source = _source()
    write_video(path, source, 25, "libx264", timestamps=times)
    frames = _within(30, lambda: read_video(path, decoder).frames)
    assert frames.shape[1:] == (HEIGHT, WIDTH, 3) and len(frames) >= 1
    # Every delivered frame is one of the encoded frames, in display order.
    nearest = [int(np.argmin([_error(frame[None], source[i : i + 1]) for i in range(FRAMES)])) for frame in frames]
    assert all(_error(frame[None], source[i : i + 1]) < MAX_ERROR for frame, i in zip(frames, nearest))
    assert nearest == sorted(nearest)
    with open_video(path, decoder) as reader:
        last = reader.info.num_frames - 1
        assert torch.equal(_within(30, reader.get_frames, [last, 0]), frames[[last, 0]])


@pytest.mark.parametrize("decoder", DECODERS)
def test_rotation_metadata(tmp_path, decoder):
    _require(decoder)
    path = tmp_path / "rotated.mp4"
    write_video(path, _source(), FPS, "libx264", rotation=90)
    info = probe(path, decoder)
    if decoder == "decord":  # decord sizes frames by the rotation without rotating them: a clear error
        with pytest.raises(VideoDecodeError, match="rotation"):
            _within(30, lambda: read_video(path, decoder))
        return
    frames = _within(30, lambda: read_video(path, decoder).frames)
    # Frames come as the backend reports them (stored, or rotated with a size that says so).
    assert frames.shape == (info.num_frames, info.height, info.width, 3)
    if (info.height, info.width) == (HEIGHT, WIDTH):
        assert _error(frames, _source()) < MAX_ERROR


@pytest.mark.parametrize("decoder", DECODERS)
def test_header_without_frame_count(encoded, decoder):
    _require(decoder)
    import av

    path = encoded("libx264", ".mkv")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # Matroska has no frame count: it is estimated
    assert probe(path, decoder).num_frames == FRAMES
    assert len(read_video(path, decoder).frames) == FRAMES


def _truncated(tmp_path: Path, suffix: str, container_options: dict[str, str]) -> Path:
    source = _source(36)
    whole = tmp_path / f"whole{suffix}"
    write_video(whole, source, FPS, "libx264", options={"g": "12"}, container_options=container_options)
    data = whole.read_bytes()
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(data[: int(len(data) * 0.6)])  # cuts the second of three GOPs
    return path


TRUNCATIONS = [(".mp4", {"movflags": "+faststart"}), (".mkv", {}), (".ts", {}), (".mp4", {})]
# A file whose MP4 index (moov) comes after the media data loses it when truncated: it cannot be opened.
UNOPENABLE_WHEN_TRUNCATED = {"mp4-moov-at-end"}


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize(("suffix", "options"), TRUNCATIONS, ids=["mp4-faststart", "mkv", "ts", "mp4-moov-at-end"])
def test_file_truncated_mid_gop(request, tmp_path, decoder, suffix, options):
    _require(decoder)
    path = _truncated(tmp_path, suffix, options)
    if request.node.callspec.id.startswith(tuple(UNOPENABLE_WHEN_TRUNCATED)):
        with pytest.raises(VideoDecodeError, match="corrupt or truncated video"):
            _within(30, probe, path, decoder)
        return
    # Reading everything either fails with a clear error or yields frames; never anything else.
    try:
        frames = _within(30, lambda: read_video(path, decoder).frames)
    except VideoDecodeError as error:
        assert error.path == str(path) and error.reason
    else:
        assert frames.shape[1:] == (HEIGHT, WIDTH, 3)
    try:
        with open_video(path, decoder) as reader:
            early = _within(30, reader.get_frames, [0, 5])
    except VideoDecodeError:
        if decoder == "pyav":
            raise  # PyAV must deliver the intact start of a file whose header it can read
        assert (decoder, "libx264", suffix) in KNOWN_LIMITS or decoder == "decord"
    else:
        assert _error(early, _source(36)[[0, 5]]) < MAX_ERROR


def test_truncated_mid_gop_is_reported_as_truncated_by_pyav(tmp_path):
    # (A truncated transport stream is just a shorter one: its packets are counted, no header says more.)
    for suffix, options in ((".mp4", {"movflags": "+faststart"}), (".mkv", {})):
        with pytest.raises(VideoDecodeError, match="truncated"):
            read_video(_truncated(tmp_path, suffix, options), "pyav")


@pytest.mark.parametrize("decoder", DECODERS)
def test_audio_only_file(tmp_path, decoder):
    _require(decoder)
    import av

    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for start in range(0, 16000, 1024):
            samples = np.sin(np.arange(start, start + 1024) / 10.0).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoDecodeError) as caught:
        _within(30, probe, path, decoder)
    assert caught.value.path == str(path)
    assert caught.value.reason == "no video stream"  # every backend, in the same words


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv"])
def test_variable_frame_rate_frames_are_counted_in_display_order_in_every_container(tmp_path, suffix):
    """A slow start then a burst (a phone recording, a stream with a freeze): frame i is the i-th frame
    shown, in every container and for PyAV and decord alike, never 'truncated' nor repeated."""
    times = [0.0, 1.0, 2.0, 3.0, 3.04, 3.08, 3.12, 3.16, 3.2, 3.24, 3.28, 3.32]
    path = tmp_path / f"vfr{suffix}"
    source = _source()
    write_video(path, source, 25, "libx264", timestamps=times)
    frames = _within(30, lambda: read_video(path, "pyav").frames)
    assert len(frames) == FRAMES
    assert all(_error(frames[i : i + 1], source[i : i + 1]) < MAX_ERROR for i in range(FRAMES))
    with open_video(path, "pyav") as reader:
        assert reader.info.num_frames == FRAMES
        assert torch.equal(_within(30, reader.get_frames, [9, 2, 9]), frames[[9, 2, 9]])  # seeks by the table
    if decoder_available("decord"):
        assert torch.equal(_within(30, lambda: read_video(path, "decord").frames), frames)


@pytest.mark.parametrize("suffix", [".mkv", ".ts", ".webm"])
def test_streams_that_start_late_are_read_whole_and_in_order(tmp_path, suffix):
    """A Matroska/WebM duration runs from time 0: a stream starting at 0.5 s is not a cut download."""
    times = [0.5 + t for t in (0.0, 0.04, 0.08, 0.5, 0.54, 0.58, 0.62, 1.0, 1.04, 1.08, 1.12, 1.16)]
    path = tmp_path / f"late{suffix}"
    source = _source()
    write_video(path, source, 25, "libvpx-vp9" if suffix == ".webm" else "libx264", timestamps=times)
    with open_video(path, "pyav") as reader:
        assert reader.info.num_frames == FRAMES
        frames = _within(30, reader.get_frames, list(range(FRAMES)))
    assert all(_error(frames[i : i + 1], source[i : i + 1]) < MAX_ERROR for i in range(FRAMES))
    with open_video(path, "pyav") as reader:  # a fresh reader seeks through the table
        assert torch.equal(_within(30, reader.get_frames, [10, 4]), frames[[10, 4]])


def test_audio_that_outlasts_the_video_is_no_cut(tmp_path):
    """The container's duration follows its longest stream: frames are counted, not estimated from it."""
    import av

    path = tmp_path / "long_audio.mkv"
    source = _source()
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        for image in source:
            for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        for start in range(0, 32000, 1024):  # 2 s of audio against 0.5 s of video
            samples = np.sin(np.arange(start, start + 1024) / 10.0).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    with open_video(path, "pyav") as reader:
        assert reader.info.num_frames == FRAMES
    assert len(_within(30, lambda: read_video(path, "pyav").frames)) == FRAMES


def test_an_elementary_stream_without_timestamps_is_counted_by_its_packets(tmp_path):
    import av

    path = tmp_path / "raw.h264"
    source = _source()
    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for image in source:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames = _within(30, lambda: read_video(path, "pyav").frames)
    assert len(frames) == FRAMES
    assert all(_error(frames[i : i + 1], source[i : i + 1]) < MAX_ERROR for i in range(FRAMES))
