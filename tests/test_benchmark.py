"""The benchmark tool runs end to end on a tiny model and writes its table and plot (no timing asserted)."""

from __future__ import annotations

import json
import math

import pytest

from oct3d.benchmark import benchmark_models, main

TINY = {"base_width": 8, "depths": [1, 1, 1, 1], "num_classes": 3}


def test_benchmark_writes_markdown_and_plot(tmp_path, capsys):
    out, plot = tmp_path / "bench.md", tmp_path / "bench.png"
    status = main([
        "--model", "oct_i3d_r50", "--model-kwargs", json.dumps(TINY), "--clip", "3x24x24", "--batch-size", "2",
        "--alphas", "0.25", "0.5", "--octave", "spatial", "spatiotemporal", "--warmup", "0", "--iters", "1",
        "--output", str(out), "--plot", str(plot),
    ])
    assert status == 0
    table = out.read_text()
    assert table.count("| oct_i3d_r50 |") == 2 * 2 * 2  # alphas x octave modes x (inference, train)
    assert "time ratio" in table and "MAC ratio" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Peer: oct_i3d_r50 alpha=0" in capsys.readouterr().out


def test_results_have_finite_ratios_and_mac_ratio_below_one():
    rows = benchmark_models(
        "oct_i3d_r50", [0.5], ["spatiotemporal"], ["inference"], batch_size=1, frames=4, size=32,
        warmup=0, iters=1, model_kwargs=TINY,
    )
    (row,) = rows
    assert math.isfinite(row.time_ratio) and row.time_ratio > 0
    assert 0 < row.mac_ratio < 1
    assert row.shape == (1, 3, 4, 32, 32)


def test_scaling_over_frames(tmp_path):
    out = tmp_path / "scaling.md"
    assert main([
        "--model", "oct_c2d_r50", "--model-kwargs", json.dumps(TINY), "--clip", "8x16x16", "--batch-size", "1",
        "--alphas", "0.5", "--scaling", "frames", "--mode", "inference", "--warmup", "0", "--iters", "1",
        "--output", str(out),
    ]) == 0
    assert [line.split("|")[1].strip() for line in out.read_text().splitlines() if line.startswith("| ") and
            line.split("|")[1].strip().isdigit()] == ["8", "16", "32"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        benchmark_models("oct_nope", [0.5])
    with pytest.raises(SystemExit):
        main(["--clip", "8x224"])
    assert main(["--model", "oct_resnet50", "--octave", "spatial"]) == 2
