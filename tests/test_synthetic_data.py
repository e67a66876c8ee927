"""Synthetic Kinetics-format data: layout, determinism, motion that tells the classes apart, the CLI."""

from __future__ import annotations

import csv
import itertools
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from datamodules.synthetic import MOTION_CLASSES, main, make_synthetic_kinetics, render_motion_video
from datamodules.video import read_video

REPO = Path(__file__).resolve().parents[1]
TINY = dict(num_classes=2, train_per_class=1, val_per_class=1, test_per_class=0, frames=8, size=32, fps=8)


def test_official_layout(tiny_kinetics):
    for split, count in (("train", 6), ("val", 3), ("test", 3)):
        with open(tiny_kinetics / "annotations" / f"{split}.csv", newline="") as handle:
            reader = csv.DictReader(handle)
            assert reader.fieldnames == ["label", "youtube_id", "time_start", "time_end", "split"]
            rows = list(reader)
        assert len(rows) == count
        for row in rows:
            assert row["split"] == split and row["label"] in MOTION_CLASSES[:3]
            assert re.fullmatch(r"[A-Za-z0-9_-]{11}", row["youtube_id"])
            assert int(row["time_end"]) - int(row["time_start"]) == 2  # 16 frames at 8 fps
            name = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"
            assert (tiny_kinetics / split / row["label"] / name).is_file()  # label folders keep their spaces


def test_deterministic_by_seed(tmp_path):
    first = make_synthetic_kinetics(tmp_path / "a", seed=3, **TINY)
    second = make_synthetic_kinetics(tmp_path / "b", seed=3, **TINY)
    other = make_synthetic_kinetics(tmp_path / "c", seed=4, **TINY)
    assert first.videos_per_split == {"train": 2, "val": 2}
    csv_a = (tmp_path / "a" / "annotations" / "train.csv").read_text()
    assert csv_a == (tmp_path / "b" / "annotations" / "train.csv").read_text()
    assert csv_a != (tmp_path / "c" / "annotations" / "train.csv").read_text()
    videos_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.mp4"))
    assert videos_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.mp4"))
    for relative in videos_a:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes()
    assert second.total_bytes == first.total_bytes and other.total_bytes != first.total_bytes


def _shift_between(previous: np.ndarray, current: np.ndarray, limit: int = 5) -> tuple[int, int]:
    """Integer (dy, dx) that best maps ``previous`` onto ``current`` (content displacement)."""
    gray_previous, gray_current = previous.mean(-1), current.mean(-1)
    best, best_error = (0, 0), np.inf
    inner = slice(limit, -limit)
    for dy in range(-limit, limit + 1):
        for dx in range(-limit, limit + 1):
            moved = np.roll(gray_previous, (dy, dx), axis=(0, 1))
            error = np.mean((moved[inner, inner] - gray_current[inner, inner]) ** 2)
            if error < best_error:
                best, best_error = (dy, dx), error
    return best


@pytest.mark.parametrize(
    ("label", "direction"),
    [("moving left", (0, -1)), ("moving right", (0, 1)), ("moving up", (-1, 0)), ("moving down", (1, 0))],
)
def test_translation_classes_move_their_way(label, direction):
    video = render_motion_video(label, np.random.default_rng(7), frames=6, size=48).astype(np.float64)
    for previous, current in itertools.pairwise(video):
        dy, dx = _shift_between(previous, current)
        # 1.5 to 3 pixels per frame in the class direction, none across it.
        assert (np.sign(dy), np.sign(dx)) == direction
        assert 1 <= abs(dy) + abs(dx) <= 3


def test_rotation_and_zoom_classes_are_time_reversals():
    # Same seed: clockwise played backwards is a counterclockwise video; zoom in reversed is zoom out.
    for forward, backward in (("rotating clockwise", "rotating counterclockwise"), ("zooming in", "zooming out")):
        a = render_motion_video(forward, np.random.default_rng(5), frames=6, size=32).astype(int)
        b = render_motion_video(backward, np.random.default_rng(5), frames=6, size=32).astype(int)
        assert not np.array_equal(a, b)
        if forward == "zooming in":
            assert np.abs(a - b[::-1]).max() <= 1
        else:
            assert np.abs(a[0] - b[0]).max() <= 1  # same start, opposite turns


def test_frames_survive_encoding(tiny_kinetics):
    video = read_video(sorted((tiny_kinetics / "val").rglob("*.mp4"))[0])
    assert video.frames.shape == (16, 32, 32, 3)
    # Textured (not flat) and moving: consecutive frames differ.
    assert video.frames.float().std() > 20
    assert (video.frames[1:].float() - video.frames[:-1].float()).abs().mean() > 5


def test_refuses_to_overwrite_without_flag(tmp_path):
    make_synthetic_kinetics(tmp_path / "d", **TINY)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_synthetic_kinetics(tmp_path / "d", **TINY)
    summary = make_synthetic_kinetics(tmp_path / "d", overwrite=True, **{**TINY, "num_classes": 3})
    assert summary.class_names == ("moving left", "moving right", "moving up")
    assert sorted(p.name for p in (tmp_path / "d" / "train").iterdir()) == list(summary.class_names)


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [("num_classes", 9, "num_classes"), ("size", 33, "size"), ("frames", 1, "frames"), ("train_per_class", 0, "train")],
)
def test_bad_arguments(tmp_path, argument, value, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic_kinetics(tmp_path / "e", **{**TINY, argument: value})
    with pytest.raises(ValueError, match="label"):
        render_motion_video("jumping", np.random.default_rng(0))


def test_cli(tmp_path, capsys):
    assert (
        main(
            [
                str(tmp_path / "f"),
                "--classes",
                "2",
                "--train-per-class",
                "1",
                "--val-per-class",
                "1",
                "--test-per-class",
                "1",
                "--frames",
                "8",
                "--size",
                "32",
            ]
        )
        == 0
    )
    assert "2 classes (moving left, moving right), 2 train, 2 val, 2 test videos" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "f")])  # exists already
    capsys.readouterr()
    # Errors name the flags the user typed, and a file given as OUT is refused without a traceback.
    (tmp_path / "file.mp4").write_bytes(b"")
    for argv, message in (([str(tmp_path / "g"), "--classes", "20"], "--classes must be in [2, 8]"),
                          ([str(tmp_path / "g"), "--train-per-class", "0"], "--train-per-class"),
                          ([str(tmp_path / "file.mp4")], "OUT must be a folder")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_tool_script_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["make_synthetic_kinetics.py", "--help"])
    with pytest.raises(SystemExit) as caught:
        runpy.run_path(str(REPO / "tools" / "make_synthetic_kinetics.py"), run_name="__main__")
    assert caught.value.code == 0
    assert "--classes" in capsys.readouterr().out
