"""Video decoding with PyAV and decord: frames, metadata, seeking, and errors on unreadable files."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.decoders import decoder_available
from datamodules.synthetic import render_motion_video, write_mp4
from datamodules.video import (
    DECODERS,
    VideoDecodeError,
    clip_indices,
    is_video_file,
    open_video,
    probe,
    read_clip,
    read_video,
)

# Every backend, skipped where it cannot load (torchcodec needs the system FFmpeg libraries).
BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(not decoder_available(name), reason=f"{name} cannot load here"))
    for name in DECODERS
]


def _first_video(root: Path, split: str = "train") -> Path:
    return sorted((root / split).rglob("*.mp4"))[0]


@pytest.fixture(scope="module")
def keyframe_video(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 24-frame video with a keyframe every 4 frames, and its source frames."""
    frames = render_motion_video("moving up", np.random.default_rng(1), frames=24, size=32)
    path = tmp_path_factory.mktemp("video") / "keyframes.mp4"
    write_mp4(path, frames, fps=8, keyframe_interval=4)
    return path, frames


@pytest.mark.parametrize("decoder", BACKENDS)
def test_decoders_read_synthetic_mp4(tiny_kinetics, decoder):
    path = _first_video(tiny_kinetics)
    video = read_video(path, decoder=decoder)
    assert video.frames.shape == (16, 32, 32, 3)
    assert video.frames.dtype == torch.uint8
    assert video.fps == 8.0
    assert video.duration == pytest.approx(2.0)
    info = probe(path, decoder=decoder)
    assert (info.num_frames, info.height, info.width, info.fps) == (16, 32, 32, 8.0)


def test_decoders_agree_and_match_source(keyframe_video):
    path, source = keyframe_video
    pyav = read_video(path, "pyav").frames
    decord = read_video(path, "decord").frames
    # H.264 decoding is bit-exact by specification, so the two FFmpeg builds must agree.
    assert torch.equal(pyav, decord)
    # Lossy, but the luma is close to what was encoded (crf 20; the 4:2:0 chroma loses more).
    luma = torch.tensor([0.299, 0.587, 0.114])
    assert (pyav.float() @ luma - torch.from_numpy(source).float() @ luma).abs().mean() < 3.0


@pytest.mark.parametrize("decoder", BACKENDS)
def test_read_clip_matches_full_decode(keyframe_video, decoder):
    path, _ = keyframe_video
    full = read_video(path, decoder).frames
    clip = read_clip(path, start_sec=1.0, num_frames=4, sampling_rate=3, decoder=decoder)  # frames 8, 11, 14, 17
    assert clip.shape == (4, 32, 32, 3)
    assert torch.equal(clip, full[8:18:3])


def test_pyav_seeks_instead_of_decoding_from_start(keyframe_video):
    path, _ = keyframe_video
    with open_video(path, "pyav") as reader:
        frames = reader.get_frames([21, 22, 23])
        # Keyframe at 20: decoding starts there (4 frames), not at frame 0 (24 frames).
        assert reader.frames_decoded == 4
    assert torch.equal(frames, read_video(path).frames[21:24])


@pytest.mark.parametrize("decoder", BACKENDS)
def test_get_frames_any_order_with_repeats_and_clamping(keyframe_video, decoder):
    path, _ = keyframe_video
    full = read_video(path, decoder).frames
    with open_video(path, decoder) as reader:
        frames = reader.get_frames([5, 2, 5, 30])
    assert torch.equal(frames, full[[5, 2, 5, 23]])


def test_read_clip_past_the_end_spreads_over_remaining_frames(keyframe_video):
    path, _ = keyframe_video
    full = read_video(path).frames
    clip = read_clip(path, start_sec=2.0, num_frames=4, sampling_rate=4)  # would need frames 16..28 of 24
    assert torch.equal(clip, full[[16, 18, 21, 23]])


def test_clip_indices():
    assert clip_indices(100, 10, 4, 8) == [10, 18, 26, 34]
    assert clip_indices(10, 0, 4, 8) == [0, 3, 6, 9]  # too short: spread uniformly
    assert clip_indices(3, 0, 5, 1) == [0, 0, 1, 2, 2]  # fewer frames than asked: repeats
    assert clip_indices(10, 50, 2, 1) == [9, 9]
    with pytest.raises(ValueError, match="sampling_rate"):
        clip_indices(10, 0, 4, 0)
    with pytest.raises(ValueError, match="num_frames"):
        clip_indices(10, 0, 0, 1)


@pytest.fixture(scope="module")
def unreadable_files(tiny_kinetics, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("unreadable")
    data = _first_video(tiny_kinetics).read_bytes()
    files = {
        "truncated": folder / "truncated.mp4",
        "text": folder / "text.mp4",
        "empty": folder / "empty.mp4",
        "missing": folder / "missing.mp4",
        "directory": folder / "directory.mp4",
    }
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["text"].write_text("definitely not a video\n" * 50)
    files["empty"].write_bytes(b"")
    files["directory"].mkdir()
    return files


@pytest.mark.parametrize("decoder", BACKENDS)
@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated", r"^corrupt or truncated video \(cannot open: "),
        ("text", r"^not a video file \(cannot open: "),
        ("empty", r"empty file"),
        ("missing", r"file not found"),
        ("directory", r"not a regular file"),
    ],
)
def test_unreadable_files_raise_video_decode_error(unreadable_files, decoder, kind, reason):
    path = unreadable_files[kind]
    with pytest.raises(VideoDecodeError) as caught:
        read_video(path, decoder=decoder)
    assert re.search(reason, caught.value.reason), caught.value.reason
    assert caught.value.path == str(path)
    assert str(caught.value).startswith(f"{path}: ")
    with pytest.raises(VideoDecodeError):
        read_clip(path, 0.0, 4, 2, decoder=decoder)


def test_video_decode_error_survives_pickling():
    # DataLoader workers send exceptions to the main process by pickling them.
    error = pickle.loads(pickle.dumps(VideoDecodeError("/data/a.mp4", "truncated: x")))
    assert (error.path, error.reason, str(error)) == ("/data/a.mp4", "truncated: x", "/data/a.mp4: truncated: x")


def test_bad_arguments(keyframe_video):
    path, _ = keyframe_video
    with pytest.raises(ValueError, match="decoder must be one of"):
        read_video(path, decoder="torchvision")
    with pytest.raises(ValueError, match="start_sec"):
        read_clip(path, -1.0, 4)
    with open_video(path) as reader, pytest.raises(ValueError, match="indices"):
        reader.get_frames([])
    assert is_video_file("a/b.MP4") and not is_video_file("a/b.txt")


# Backends and multi-clip reads ------------------------------------------------------------------------

from datamodules import decoders  # noqa: E402
from datamodules.decoders import available_decoders, require_decoder, resolve_decoder  # noqa: E402


@pytest.mark.parametrize("decoder", BACKENDS)
def test_get_clips_one_pass_many_clips(keyframe_video, decoder):
    path, _ = keyframe_video
    full = read_video(path, decoder).frames
    clips = [[2, 4, 6], [21, 22, 23], [0, 23, 40]]
    with open_video(path, decoder) as reader:
        out = reader.get_clips(clips, sizes=[None, (16, 20), None])
    assert torch.equal(out[0], full[[2, 4, 6]])
    assert torch.equal(out[2], full[[0, 23, 23]])  # past the end: clamped
    assert out[1].shape == (3, 16, 20, 3)
    with open_video(path, decoder) as reader, pytest.raises(ValueError, match="sizes"):
        reader.get_clips(clips, sizes=[None])


def test_pyav_skips_frames_nothing_needs_and_stays_exact(keyframe_video):
    path, _ = keyframe_video
    full = read_video(path).frames
    with open_video(path) as reader:
        frames = reader.get_frames([1, 13, 19])
        # Keyframes every 4: frames 0-19 would be decoded in full; non-reference frames are skipped.
        assert reader.frames_decoded < 20
    assert torch.equal(frames, full[[1, 13, 19]])


def test_pyav_decode_time_resize_close_to_torch_resize(keyframe_video):
    path, _ = keyframe_video
    with open_video(path, decode_time_resize=True) as reader:
        scaled = reader.get_clips([[3, 9]], sizes=[(40, 40)])[0]
    with open_video(path) as reader:
        resized = reader.get_clips([[3, 9]], sizes=[(40, 40)])[0]
    assert scaled.shape == resized.shape == (2, 40, 40, 3)
    # libswscale interpolates the 4:2:0 chroma at the target size, torchvision the RGB frames: on this
    # high-frequency texture they differ by a few levels; a wrong scale or crop would differ by tens.
    assert (scaled.float() - resized.float()).abs().mean() < 10.0


def test_decoder_names_and_auto(keyframe_video, monkeypatch):
    assert resolve_decoder("auto") in available_decoders()
    assert "pyav" in available_decoders()
    with pytest.raises(ValueError, match="decoder must be one of"):
        resolve_decoder("opencv")
    path, _ = keyframe_video
    assert probe(path, "auto").num_frames == 24
    # torchcodec without FFmpeg libraries: a clear error naming what to install, and auto avoids it.
    monkeypatch.setattr(decoders, "_torchcodec_load_error", lambda: "OSError: libavutil.so: not found")
    with pytest.raises(ValueError, match=r"torchcodec.*FFmpeg.*libavutil"):
        require_decoder("torchcodec")
    with pytest.raises(ValueError, match="FFmpeg"):
        open_video(path, "torchcodec")
    assert "torchcodec" not in available_decoders()
    assert resolve_decoder("auto") != "torchcodec"


def test_all_extensions_are_video_files():
    from datamodules.video import VIDEO_EXTENSIONS

    expected = [
        ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".m2ts", ".mts", ".wmv", ".flv",
        ".3gp", ".ogv",
    ]
    assert sorted(VIDEO_EXTENSIONS) == sorted(expected)
    assert all(is_video_file(f"clip{suffix.upper()}") for suffix in expected)


def test_a_clip_wholly_past_a_cut_is_reported_as_truncated():
    from datamodules.decoders import _fill_tail

    with pytest.raises(VideoDecodeError, match="truncated: header says 32 frames, none decodes from frame 20 on"):
        _fill_tail("cut.mkv", {}, [20, 22, 24], 0, 32)
    with pytest.raises(VideoDecodeError, match="no frame could be decoded"):
        _fill_tail("bad.mp4", {}, [0, 2], 0, 32)
    with pytest.raises(VideoDecodeError, match="no frame could be decoded"):  # a header over-count of a few frames
        _fill_tail("long.mp4", {}, [31], 0, 32)


def test_clip_indices_fractional_rate_and_source_step():
    from datamodules.video import check_target_fps, clip_span, source_step

    # A rate counted at a target fps: 8 frames at 30 fps are 16 at 60 fps and 6.67 at 25 fps.
    assert source_step(8, 30.0, 30.0) == 8 and source_step(8, 60.0, 30.0) == 16
    assert source_step(8, 25.0, 30.0) == pytest.approx(20 / 3)
    assert source_step(8, 60.0, None) == 8  # no target: source frames, whatever the video's rate
    assert clip_indices(100, 0, 4, 20 / 3) == [0, 7, 13, 20]  # nearest frames, half up
    assert clip_indices(100, 0, 5, 0.5) == [0, 1, 1, 2, 2]  # a slower video repeats frames
    assert clip_indices(100, 10, 4, 8.0) == clip_indices(100, 10, 4, 8) == [10, 18, 26, 34]
    assert clip_span(4, 20 / 3) == 21 and clip_span(4, 8) == 25
    assert clip_indices(15, 0, 4, 20 / 3) == [0, 5, 9, 14]  # past the end: spread over what there is
    with pytest.raises(ValueError, match="sampling_rate must be a positive number"):
        clip_indices(10, 0, 4, float("nan"))
    for bad in (0, -30, float("inf"), "30", True):
        with pytest.raises(ValueError, match="target_fps must be a positive number"):
            check_target_fps(bad)
    assert check_target_fps(None) is None and check_target_fps(30) == 30.0


def test_read_clip_with_target_fps_spans_the_same_time(tmp_path):
    from datamodules.synthetic import write_mp4

    frames = render_motion_video("moving up", np.random.default_rng(2), frames=24, size=32)
    slow, fast = tmp_path / "slow.mp4", tmp_path / "fast.mp4"
    write_mp4(slow, frames[::2], fps=6)  # the same motion at 6 and at 12 fps
    write_mp4(fast, frames, fps=12)
    # 3 frames every 2 frames at 6 fps: the 12 fps video is read every 4 frames, from the same time.
    a = read_clip(slow, 0.5, 3, 2, target_fps=6)
    b = read_clip(fast, 0.5, 3, 2, target_fps=6)
    assert torch.equal(a, read_video(slow).frames[[3, 5, 7]])
    assert torch.equal(b, read_video(fast).frames[[6, 10, 14]])
    assert (a.float() - b.float()).abs().mean() < 8  # the same content (two lossy encodings of it)
    # Without a target the 12 fps clip covers half the time.
    assert torch.equal(read_clip(fast, 0.5, 3, 2), read_video(fast).frames[[6, 8, 10]])
