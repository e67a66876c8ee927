"""tools/infer.py (oct3d.inference): checkpoints, folders with broken files, windows, views, batching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from oct3d.inference import find_inputs, load_predictor, main, plan_segments

CLASSES = ["moving left", "moving right", "moving up"]


@pytest.fixture(scope="module")
def checkpoint(tiny_video_checkpoint) -> Path:
    return tiny_video_checkpoint


@pytest.fixture()
def mixed_folder(tiny_kinetics, tmp_path) -> tuple[Path, list[Path]]:
    """Two good videos (one nested), a truncated mp4, a text file named .mp4 and an ignored .txt."""
    good = sorted((tiny_kinetics / "test").rglob("*.mp4"))[:2]
    folder = tmp_path / "inputs"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(good[0], folder / "a_good.mp4")
    shutil.copy(good[1], folder / "nested" / "b_good.mp4")
    data = good[0].read_bytes()
    (folder / "c_truncated.mp4").write_bytes(data[: len(data) // 3])
    (folder / "d_text.mp4").write_text("not a video\n" * 10)
    (folder / "notes.txt").write_text("ignored")
    return folder, good


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_with_broken_files(checkpoint, mixed_folder, tmp_path):
    folder, _ = mixed_folder
    output = tmp_path / "out.jsonl"
    status = main(["--checkpoint", str(checkpoint), "--output", str(output), "--device", "cpu", str(folder)])
    assert status == 1
    results = {Path(r["path"]).name: r for r in _lines(output)}
    assert sorted(results) == ["a_good.mp4", "b_good.mp4", "c_truncated.mp4", "d_text.mp4"]
    assert set(results["c_truncated.mp4"]) == {"path", "error"}
    assert set(results["d_text.mp4"]) == {"path", "error"}
    for name in ("a_good.mp4", "b_good.mp4"):
        assert set(results[name]) == {"path", "topk"}
        topk = results[name]["topk"]
        assert len(topk) == 3  # --topk 5 clipped to the 3 classes
        assert sorted(p["label"] for p in topk) == CLASSES
        scores = [p["score"] for p in topk]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-4)


def test_all_good_exits_zero_and_batching_does_not_change_results(checkpoint, mixed_folder, tmp_path):
    _, good = mixed_folder
    runs = []
    for batch_size in ("1", "3"):
        output = tmp_path / f"out{batch_size}.jsonl"
        args = ["--checkpoint", str(checkpoint), "--output", str(output), "--batch-size", batch_size,
                "--views", "30", *map(str, good)]
        assert main(args) == 0
        runs.append(_lines(output))
    for first, second in zip(*runs):
        assert [p["label"] for p in first["topk"]] == [p["label"] for p in second["topk"]]
        assert [p["score"] for p in first["topk"]] == pytest.approx([p["score"] for p in second["topk"]], abs=1e-5)


def test_windows_give_segments_with_times(checkpoint, mixed_folder, tmp_path):
    _, good = mixed_folder
    output = tmp_path / "windows.jsonl"
    args = ["--checkpoint", str(checkpoint), "--output", str(output), "--window", "1", "--hop", "0.5", str(good[0])]
    assert main(args) == 0
    (result,) = _lines(output)
    # 16 frames at 8 fps = 2 s: windows [0, 1], [0.5, 1.5], [1, 2]
    assert [(s["start"], s["end"]) for s in result["segments"]] == [(0.0, 1.0), (0.5, 1.5), (1.0, 2.0)]
    assert all(len(s["topk"]) == 3 for s in result["segments"])


def test_windows_of_a_long_video_stream_through_the_model_in_bounded_parts(checkpoint, mixed_folder, tmp_path,
                                                                           monkeypatch):
    import oct3d.inference as inference

    _, good = mixed_folder
    unreadable = tmp_path / "z_text.mp4"
    unreadable.write_text("not a video\n" * 10)
    files = [good[0], unreadable, good[1]]
    predictor = load_predictor(checkpoint, "cpu")
    whole = list(inference.predict_files(predictor, files, 3, 1, 0.25, 0.125, batch_size=64))
    loaded = []
    real = inference._load_video_views
    monkeypatch.setattr(inference, "_load_video_views", lambda *a: loaded.append(len(a[-1] or [])) or real(*a))
    parts = list(inference.predict_files(predictor, files, 3, 1, 0.25, 0.125, batch_size=3))
    assert len(whole[0]["segments"]) == 15 and max(loaded) <= 3  # parts of at most a batch of views
    assert [r["path"] for r in parts] == [str(f) for f in files] and "error" in parts[1]
    for a, b in zip(whole, parts):
        assert a.keys() == b.keys()
        if "segments" in a:
            assert [s["start"] for s in a["segments"]] == [s["start"] for s in b["segments"]]
            assert [p["score"] for p in a["topk"]] == pytest.approx([p["score"] for p in b["topk"]], abs=1e-5)


def test_a_missing_input_is_reported_and_the_others_go_on(checkpoint, mixed_folder, tmp_path, capsys):
    _, good = mixed_folder
    output = tmp_path / "preds.jsonl"
    missing = str(tmp_path / "missing.mp4")
    assert main(["--checkpoint", str(checkpoint), "--output", str(output), missing, str(good[0])]) == 1
    first, second = _lines(output)
    assert first == {"path": missing, "error": "does not exist"} and "topk" in second
    assert "1 of 2 files failed" in capsys.readouterr().err
    # Results come in argument order, missing paths included.
    other = str(tmp_path / "other.mp4")
    assert main(["--checkpoint", str(checkpoint), "--output", str(output), str(good[0]), missing, str(good[1]),
                 other]) == 1
    assert [r["path"] for r in _lines(output)] == [str(good[0]), missing, str(good[1]), other]
    assert main(["--checkpoint", str(checkpoint), "--output", str(output), missing]) == 1  # reported, not a crash
    with pytest.raises(SystemExit):  # an output folder that does not exist is a usage error, before any work
        main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "nowhere" / "p.jsonl"), str(good[0])])
    assert "folder" in capsys.readouterr().err


def test_table_without_output(checkpoint, mixed_folder, capsys):
    _, good = mixed_folder
    assert main(["--checkpoint", str(checkpoint), "--topk", "2", str(good[0])]) == 0
    out = capsys.readouterr().out
    assert "oct3d predictions" in out and good[0].name[:10] in out


def test_json_lines_to_stdout_and_failure_reasons_in_the_table_at_top1(checkpoint, mixed_folder, capsys):
    folder, _ = mixed_folder
    text = folder / "d_text.mp4"
    assert main(["--checkpoint", str(checkpoint), "--output", "-", str(text), str(folder / "a_good.mp4")]) == 1
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["path"] == str(text) and "error" in first and "topk" in second
    assert main(["--checkpoint", str(checkpoint), "--topk", "1", str(text)]) == 1
    assert "not a video" in capsys.readouterr().out  # the reason, not just "error"


def test_foreign_checkpoint_is_a_clear_error(tmp_path, mixed_folder, capsys):
    _, good = mixed_folder
    foreign = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, foreign)
    assert main(["--checkpoint", str(foreign), str(good[0])]) == 2
    assert "is not an oct3d checkpoint" in capsys.readouterr().err
    segmentation = tmp_path / "unet.ckpt"
    torch.save({"state_dict": {}, "oct3d": {"format_version": 1, "task": "segmentation"}}, segmentation)
    assert main(["--checkpoint", str(segmentation), str(good[0])]) == 2
    err = capsys.readouterr().err
    assert "is a segmentation checkpoint" in err and "oct3d segment" in err
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("hello")
    assert main(["--checkpoint", str(garbage), str(good[0])]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    gzipped = tmp_path / "volume.ckpt"  # a gzip (e.g. a .nii.gz renamed): not a refusal to trust
    gzipped.write_bytes(b"\x1f\x8b\x08\x00" + bytes(60))
    assert main(["--checkpoint", str(gzipped), str(good[0])]) == 2
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "--trust-checkpoint" not in err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(foreign), "--views", "7", str(good[0])])


def test_checkpoint_metadata_drives_preprocessing(checkpoint):
    predictor = load_predictor(checkpoint, device="cpu")
    meta = predictor.metadata
    assert (meta.task, meta.backbone, meta.class_names) == ("video", "oct_i3d_r50", CLASSES)
    assert {k: meta.preprocessing[k] for k in ("num_frames", "sampling_rate", "crop_size", "short_side")} == {
        "num_frames": 4, "sampling_rate": 2, "crop_size": 32, "short_side": 32}
    assert meta.preprocessing["mean"] == [0.45, 0.45, 0.45]
    assert predictor(torch.zeros(meta.input_shape(2))).shape == (2, 3)


def test_plan_segments_and_find_inputs(mixed_folder):
    (whole,) = plan_segments(32, 8.0, clip_frames=8, sampling_rate=3, temporal_views=1)
    assert (whole.start, whole.end, whole.clip_starts) == (0.0, 4.0, (5,))  # span 22 of 32 frames, centered
    (ten,) = plan_segments(32, 8.0, clip_frames=8, sampling_rate=1, temporal_views=10)
    assert ten.clip_starts[0] == 0 and ten.clip_starts[-1] == 24 and len(ten.clip_starts) == 10
    folder, _ = mixed_folder
    assert [p.name for p in find_inputs([folder])] == ["a_good.mp4", "c_truncated.mp4", "d_text.mp4", "b_good.mp4"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_inputs([folder / "missing.mp4"])


def test_folder_scan_accepts_every_video_extension(checkpoint, tiny_kinetics, tmp_path):
    # .mpg/.mpeg used to be skipped silently; every container of the shared list is found and classified.
    from datamodules.synthetic import DEFAULT_CODECS, write_video
    from datamodules.video import VIDEO_EXTENSIONS, read_video
    from oct3d.inference import VIDEO_EXTENSIONS as INFER_EXTENSIONS

    assert INFER_EXTENSIONS is VIDEO_EXTENSIONS
    frames = read_video(sorted((tiny_kinetics / "test").rglob("*.mp4"))[0]).frames.numpy()
    folder = tmp_path / "containers"
    folder.mkdir()
    for suffix in (".mpg", ".mpeg", ".ts", ".m2ts", ".wmv", ".ogv"):
        write_video(folder / f"clip{suffix}", frames, 24, DEFAULT_CODECS[suffix])
    (folder / "clip.MPG").write_bytes((folder / "clip.mpg").read_bytes())  # extensions are case-insensitive
    found = find_inputs([folder])
    assert sorted(p.name for p in found) == sorted(
        ["clip.mpg", "clip.mpeg", "clip.ts", "clip.m2ts", "clip.wmv", "clip.ogv", "clip.MPG"]
    )
    output = tmp_path / "out.jsonl"
    assert main(["--checkpoint", str(checkpoint), "--output", str(output), "--device", "cpu", str(folder)]) == 0
    results = _lines(output)
    assert len(results) == 7 and all(len(r["topk"]) == 3 for r in results)


def test_table_tells_files_of_one_name_apart(capsys):
    from oct3d.inference import _print_table

    _print_table([{"path": "/data/a/clip.mp4", "error": "x"}, {"path": "/data/b/clip.mp4", "error": "x"},
                  {"path": "rel/clip.mp4", "error": "x"}], 1)
    out = capsys.readouterr().out
    assert "/data/a/clip.mp4" in out and "rel/clip.mp4" in out  # mixed absolute and relative: full paths
    _print_table([{"path": "/data/a/clip.mp4", "error": "x"}, {"path": "/data/b/clip.mp4", "error": "x"}], 1)
    out = capsys.readouterr().out
    assert "a/clip.mp4" in out and "b/clip.mp4" in out and "/data/" not in out


def test_a_checkpoint_folder_is_named_as_a_folder(checkpoint, mixed_folder, tmp_path, capsys):
    _, good = mixed_folder
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, folder / "checkpoints" / "last.ckpt")
    assert main(["--checkpoint", str(folder), str(good[0])]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "last.ckpt" in err


def test_outputs_that_would_overwrite_an_input_or_the_checkpoint_are_usage_errors(checkpoint, mixed_folder, tmp_path,
                                                                                   capsys):
    folder, _ = mixed_folder
    video = folder / "a_good.mp4"
    size = video.stat().st_size
    copy = tmp_path / "model.ckpt"
    shutil.copy(checkpoint, copy)
    for output, why in ((video, "also an input"), (copy, "also an input"), (tmp_path, "is a folder")):
        with pytest.raises(SystemExit) as stop:
            main(["--checkpoint", str(copy), "--output", str(output), str(video)])
        assert stop.value.code == 2 and why in capsys.readouterr().err
    assert video.stat().st_size == size and copy.stat().st_size == checkpoint.stat().st_size
    for window in ("nan", "inf", "-1"):
        with pytest.raises(SystemExit):
            main(["--checkpoint", str(copy), "--window", window, str(video)])
        assert "--window must be a finite number" in capsys.readouterr().err


def test_folder_scans_skip_hidden_files_keep_each_file_once_and_warn_of_empty_folders(checkpoint, mixed_folder,
                                                                                      tmp_path, capsys):
    folder, good = mixed_folder
    (folder / "._a_good.mp4").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # a macOS AppleDouble file
    (folder / ".cache").mkdir()
    shutil.copy(good[0], folder / ".cache" / "hidden.mp4")
    empty = tmp_path / "empty"
    empty.mkdir()
    files = find_inputs([folder, folder / "a_good.mp4"])
    assert [p.name for p in files] == ["a_good.mp4", "c_truncated.mp4", "d_text.mp4", "b_good.mp4"]
    assert find_inputs([folder / "._a_good.mp4"])[0].name == "._a_good.mp4"  # named explicitly: kept
    output = tmp_path / "out.jsonl"
    main(["--checkpoint", str(checkpoint), "--output", str(output), str(folder / "a_good.mp4"), str(empty)])
    assert "folder " + str(empty) + " holds no" in capsys.readouterr().err
    assert len(_lines(output)) == 1


def test_a_torchscript_export_without_its_sidecar_is_named_as_such(checkpoint, tmp_path, mixed_folder, capsys):
    from oct3d.export import main as export_main

    exported = tmp_path / "model.pt"
    assert export_main(["--checkpoint", str(checkpoint), "--format", "torchscript", str(exported)]) == 0
    (tmp_path / "model.pt.json").unlink()
    capsys.readouterr()
    assert main(["--checkpoint", str(exported), str(mixed_folder[0] / "a_good.mp4")]) == 2
    err = capsys.readouterr().err
    assert "exported model without its metadata sidecar" in err and "weights_only" not in err


def test_linked_files_of_other_names_are_each_kept(mixed_folder, tmp_path):
    _, good = mixed_folder
    store = tmp_path / "store"
    store.mkdir()
    blob = store / "blob"
    shutil.copy(good[0], blob)
    links = tmp_path / "links"
    links.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (links / name).symlink_to(blob)  # how DVC, git-annex and hub caches store files
    assert [p.name for p in find_inputs([links])] == ["a.mp4", "b.mp4"]
    assert [p.name for p in find_inputs([links, links / "a.mp4"])] == ["a.mp4", "b.mp4"]


def test_a_diverged_model_writes_valid_json(capsys):
    from oct3d.inference import ModelMetadata, _print_table, _topk

    meta = ModelMetadata("video", "oct_i3d_r50", {}, 3, ["a", "b", "c"], {})
    scores = _topk(meta, torch.tensor([float("nan"), 0.5, 0.2]), 2)
    line = json.dumps({"path": "x.mp4", "topk": scores}, allow_nan=False)  # a NaN would make this raise
    assert None in [p["score"] for p in json.loads(line)["topk"]]
    _print_table([{"path": "x.mp4", "topk": scores}], 2)
    assert "nan" in capsys.readouterr().out


def test_windows_of_a_variable_rate_video_follow_its_frames_timestamps(tmp_path):
    """Ten frames 0.5 s apart, then thirty at 30 fps: the 5-6 s window holds the thirty, not frames 33-39."""
    import numpy as np

    from datamodules.synthetic import write_video
    from datamodules.video import open_video

    times = [i * 0.5 for i in range(10)] + [5.0 + i / 30 for i in range(30)]
    path = tmp_path / "vfr.mp4"
    write_video(path, np.random.default_rng(0).integers(0, 255, (40, 32, 32, 3), dtype=np.uint8), 30,
                timestamps=times)
    with open_video(path, "pyav") as reader:
        frame_times = reader.frame_times()
        info = reader.info
    assert frame_times is not None and frame_times[10] == pytest.approx(5.0, abs=1e-3)
    segments = plan_segments(info.num_frames, info.fps, 8, 1, 1, window=1, hop=1, frame_times=frame_times)
    assert [s.clip_starts for s in segments[:6]] == [(0,), (2,), (4,), (6,), (8,), (21,)]
    average = plan_segments(info.num_frames, info.fps, 8, 1, 1, window=1, hop=1)  # no timestamps: i / fps
    assert average[1].clip_starts != segments[1].clip_starts


def test_non_ascii_paths_are_written_as_they_are(checkpoint, mixed_folder, tmp_path):
    _, good = mixed_folder
    named = tmp_path / "vidéo_日本.mp4"
    shutil.copy(good[0], named)
    output = tmp_path / "out.jsonl"
    assert main(["--checkpoint", str(checkpoint), "--output", str(output), "--device", "cpu", str(named)]) == 0
    text = output.read_text(encoding="utf-8")
    assert "vidéo_日本.mp4" in text and json.loads(text)["path"] == str(named)


def test_any_clip_count_and_the_checkpoints_test_protocol(checkpoint, mixed_folder, tmp_path, capsys):
    """--clips N --crops C takes any count; --test-views is the data module's test_clips x test_crops (10 x 3 here)."""
    _, good = mixed_folder
    meta = torch.load(checkpoint, weights_only=True)["oct3d"]["preprocessing"]
    assert (meta["test_clips"], meta["test_crops"]) == (10, 3)
    scores = {}
    for name, argv in (("views30", ["--views", "30"]), ("test", ["--test-views"]), ("clips", ["--clips", "10",
                                                                                               "--crops", "3"]),
                       ("two", ["--clips", "2"])):
        output = tmp_path / f"{name}.jsonl"
        assert main(["--checkpoint", str(checkpoint), "--output", str(output), "--device", "cpu", *argv,
                     str(good[0])]) == 0
        scores[name] = _lines(output)[0]["topk"]
    assert scores["views30"] == scores["test"] == scores["clips"]
    assert scores["two"] != scores["views30"]
    for argv, message in ((["--views", "3", "--clips", "2"], "--views and --clips choose the views"),
                          (["--crops", "3"], "--crops goes with --clips"), (["--clips", "0"], "--clips must be >= 1")):
        with pytest.raises(SystemExit) as stop:
            main(["--checkpoint", str(checkpoint), *argv, str(good[0])])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_file_name_that_is_not_utf8_is_written_escaped_not_a_crash(checkpoint, mixed_folder, tmp_path):
    import os

    _, good = mixed_folder
    folder = tmp_path / "bad"
    folder.mkdir()
    name = os.fsdecode(b"clip_\xff.mp4")  # a Latin-1 name on a UTF-8 file system: held as a surrogate
    shutil.copy(good[0], folder / name)
    output = tmp_path / "out.jsonl"
    assert main(["--checkpoint", str(checkpoint), "--output", str(output), "--device", "cpu", str(folder)]) == 0
    (line,) = output.read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["path"] == str(folder / name) and "\\udcff" in line


def test_csv_output_has_one_row_per_prediction_and_one_per_failure(checkpoint, mixed_folder, tmp_path, capsys):
    import csv

    folder, _ = mixed_folder
    output = tmp_path / "preds.csv"
    assert main(["--checkpoint", str(checkpoint), "--output", str(output), "--device", "cpu", "--topk", "2",
                 str(folder)]) == 1
    with open(output, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    by_file: dict[str, list[dict]] = {}
    for row in rows:
        by_file.setdefault(Path(row["path"]).name, []).append(row)
    assert sorted(by_file) == ["a_good.mp4", "b_good.mp4", "c_truncated.mp4", "d_text.mp4"]
    good = by_file["a_good.mp4"]
    assert [r["rank"] for r in good] == ["1", "2"] and all(r["label"] in CLASSES and not r["error"] for r in good)
    assert float(good[0]["score"]) >= float(good[1]["score"])
    assert len(by_file["d_text.mp4"]) == 1 and by_file["d_text.mp4"][0]["error"]
    windows = tmp_path / "windows.txt"  # --format wins over the suffix
    assert main(["--checkpoint", str(checkpoint), "--output", str(windows), "--format", "csv", "--device", "cpu",
                 "--window", "1", "--topk", "1", str(folder / "a_good.mp4")]) == 0
    segments = list(csv.DictReader(windows.read_text(encoding="utf-8").splitlines()))
    assert segments and all(r["segment_start"] != "" and r["rank"] == "1" for r in segments)
    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", str(checkpoint), "--format", "csv", str(folder)])
    assert stop.value.code == 2 and "--format sets the format of --output" in capsys.readouterr().err
