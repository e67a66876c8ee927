"""The cost-table tool: paper figures for Oct-ResNet-50, markdown and PNG output, clear errors."""

from __future__ import annotations

import pytest

from oct3d import model_table


def test_oct_resnet50_gmacs_match_the_paper(tmp_path, capsys):
    plot = tmp_path / "costs.png"
    output = tmp_path / "table.md"
    status = model_table.main(["--models", "oct_resnet50", "--markdown", "--plot", str(plot), "--output", str(output)])
    assert status == 0
    printed = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in printed.splitlines() if line.startswith("| oct_resnet50")]
    gmacs = {float(cells[2]): round(float(cells[4]), 1) for cells in rows}
    assert gmacs == {0.0: 4.1, 0.125: 3.6, 0.25: 3.1, 0.5: 2.4, 0.75: 1.9}  # paper Table 2
    assert all(abs(float(cells[6]) - 25.56) < 0.01 for cells in rows)  # parameters do not depend on alpha
    assert "| torchvision resnet50 | - | vanilla | 224x224 | 4.09 | 1.00 | 25.56 |" in printed
    memory = {float(cells[2]): float(cells[8]) for cells in rows}
    assert memory[0.0] == 1.0 and memory[0.5] < 0.7 < memory[0.25] < 1.0
    assert plot.read_bytes().startswith(b"\x89PNG") and plot.stat().st_size > 10_000
    assert output.read_text().startswith("| model |")


def test_video_rows_and_spatiotemporal_cheaper():
    rows = model_table.cost_rows(["oct_r3d_18"], alphas=[0.0, 0.5])
    peer, *octave_rows = rows
    assert peer.model == "torchvision r3d_18" and peer.input_size == (1, 3, 16, 112, 112)
    by_mode = {(r.octave, r.alpha): r for r in octave_rows}
    assert by_mode[("spatial", 0.0)].macs == peer.macs and by_mode[("spatial", 0.0)].params == peer.params
    assert by_mode[("spatiotemporal", 0.5)].macs < by_mode[("spatial", 0.5)].macs < peer.macs


def test_plain_text_and_bad_arguments(capsys):
    text = model_table.format_table(model_table.cost_rows(["oct_resnet26"], alphas=[0.5]), markdown=False)
    assert text.splitlines()[0].startswith("model") and "oct_resnet26 alpha=0" in text
    with pytest.raises(SystemExit):
        model_table.main(["--alphas", "1.5"])
    with pytest.raises(SystemExit):
        model_table.main(["--models", "no_such_model"])
    assert "no_such_model" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --models would otherwise override --task without a word
        model_table.parse_args(["--task", "image", "--models", "oct_resnet26", "oct_i3d_r50"])
    assert "--models oct_i3d_r50: not image model(s)" in capsys.readouterr().err


def test_alphas_a_model_cannot_take_are_n_a_and_all_covers_every_task(capsys):
    rows = model_table.cost_rows(["oct_resnext50_32x4d"], alphas=(0.125, 0.5))
    unavailable = [r for r in rows if r.alpha == 0.125]
    assert len(unavailable) == 1 and not unavailable[0].available and "groups=32" in unavailable[0].note
    assert "| n/a |" in model_table.format_table(rows)
    assert [r.available for r in rows if r.alpha == 0.5] == [True]
    label, _ = model_table.vanilla_peer("oct_resnext101_32x4d")  # torchvision has no resnext101_32x4d
    assert "alpha=0" in label
    assert "oct_unet3d" in model_table._models_for("all")
    with pytest.raises(SystemExit):
        model_table.parse_args(["--plot", "/nonexistent/folder/cost.png"])
    assert "--plot" in capsys.readouterr().err


def test_list_models_names_the_tasks_for_an_unknown_one():
    from oct3d.models import list_models

    with pytest.raises(ValueError, match="unknown task '2d'; tasks: image, segmentation, video"):
        list_models("2d")
