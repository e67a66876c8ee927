"""tools/benchmark_data.py (oct3d.benchmark_data): loaders, clip counts, the report; no timed assertions."""

from __future__ import annotations

import json
import math

import pytest

from oct3d import cli
from oct3d.benchmark_data import benchmark_loaders, format_table, main, make_kinetics_like

SMALL_CONFIG = """
data:
  class_path: datamodules.KineticsDataModule
  init_args:
    root: unused
    num_frames: 4
    sampling_rate: 2
    crop_size: 64
    min_short_side: 64
    max_short_side: 80
    batch_size: 2
    decoder: pyav
"""


@pytest.fixture(scope="module")
def kinetics_like(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinetics_like")
    paths = make_kinetics_like(folder, 2, seconds=1)
    return folder, paths


def test_generated_videos_are_kinetics_like(kinetics_like):
    from datamodules.video import probe

    _, paths = kinetics_like
    infos = [probe(p) for p in paths]
    assert [(i.width, i.height) for i in infos] == [(340, 256), (640, 360)]
    assert all(i.fps == 30 and i.num_frames == 30 for i in infos)


def test_benchmark_counts_clips_of_every_loader(kinetics_like, tmp_path):
    folder, _ = kinetics_like
    config = tmp_path / "small.yaml"
    config.write_text(SMALL_CONFIG)
    output = tmp_path / "result.json"
    args = [str(folder), "--config", str(config), "--videos", "4", "--rounds", "2", "--model-clips-per-s", "50",
            "--loaders", "plain", "plain:kept", "pyav:1", "pyav:2", "pyav:2:swscale", "decord:3", "--json", str(output)]
    assert main(args) == 0
    result = json.loads(output.read_text())
    clips = {r["name"]: r["clips"] for r in result["results"]}
    assert clips == {"plain": 4, "plain:kept": 4, "pyav:1": 4, "pyav:2": 8, "pyav:2:swscale": 8, "decord:3": 12}
    assert result["clip"]["num_frames"] == 4 and result["clip"]["crop_size"] == 64
    for r in result["results"]:
        assert r["decode_s"] > 0 and r["transform_s"] > 0 and r["decode_s"] + r["transform_s"] <= r["seconds"] * 1.01


def test_table_and_workers_arithmetic():
    from oct3d.benchmark_data import LoaderResult

    results = [LoaderResult("plain", 10, 1.0, 0.8, 0.1), LoaderResult("pyav:2", 30, 1.0, 0.7, 0.2)]
    table = format_table(results, model_clips_per_s=100)
    assert "| plain | 10.0 | 80.0 | 10.0 | 1.00x | 10 |" in table
    assert f"| pyav:2 | 30.0 | 23.3 | 6.7 | 3.00x | {math.ceil(100 / 30)} |" in table


def test_bad_loader_spec_and_empty_folder(kinetics_like, tmp_path, capsys):
    folder, _ = kinetics_like
    assert main([str(folder), "--loaders", "pyav:two", "--videos", "1", "--rounds", "1"]) == 2
    assert "DECODER:K" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "no videos" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no videos"):
        benchmark_loaders([], ["plain"], {})


def test_registered_as_oct3d_bench_data():
    assert cli.TOOLS["bench-data"] == "oct3d.benchmark_data:main"


def test_webm_and_unreadable_files_neither_stop_nor_distort_the_benchmark(kinetics_like, tmp_path, capsys):
    """A WebM has no frame count in its header (the plain loop took 0); unreadable files are skipped and named."""
    import numpy as np

    from datamodules.synthetic import write_video

    folder = tmp_path / "mixed"
    folder.mkdir()
    write_video(folder / "clip.webm", np.random.default_rng(0).integers(0, 255, (20, 64, 80, 3), dtype=np.uint8), 25)
    source = kinetics_like[1][0].read_bytes()
    (folder / "truncated.mp4").write_bytes(source[: len(source) // 2])
    (folder / "empty.mp4").write_bytes(b"")
    config = tmp_path / "small.yaml"
    config.write_text(SMALL_CONFIG)
    output = tmp_path / "result.json"
    assert main([str(folder), "--config", str(config), "--videos", "3", "--rounds", "1", "--loaders", "plain", "pyav:1",
                 "--json", str(output)]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 unreadable video(s): " in err and "empty.mp4" in err and "truncated.mp4" in err
    assert {r["name"]: r["clips"] for r in json.loads(output.read_text())["results"]} == {"plain": 3, "pyav:1": 3}


def test_test_view_loading_counts_opens_and_frames_per_batch_size(kinetics_like, tmp_path, capsys):
    folder, _ = kinetics_like
    config = tmp_path / "small.yaml"
    config.write_text(SMALL_CONFIG + "    test_clips: 4\n    test_crops: 3\n")
    output = tmp_path / "views.json"
    assert main([str(folder), "--config", str(config), "--test-views", "1", "4", "12", "--videos", "2",
                 "--rounds", "2", "--json", str(output)]) == 0
    table = capsys.readouterr().out
    assert "4 clips x 3 crops = 12 per video" in table and "| views per batch | opens per video" in table
    rows = {r["views_per_batch"]: r for r in json.loads(output.read_text())["test_views"]}
    assert all(r["views"] == 2 * 12 and r["videos"] == 2 for r in rows.values())
    # One open per fetch that touches a video: 12, 3 and 1 per video; a batch decodes its clips once.
    assert [rows[b]["opens"] for b in (1, 4, 12)] == [24, 6, 2]
    assert rows[1]["frames_decoded"] > rows[4]["frames_decoded"] > rows[12]["frames_decoded"] > 0
    with pytest.raises(SystemExit):
        main([str(folder), "--test-views", "0"])
    with pytest.raises(SystemExit):
        main([str(folder), "--test-views", "8", "--loaders", "plain"])
