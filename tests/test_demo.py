"""tools/demo.py: data creation, training through `lightning fit`, predictions on held-out clips (CI-sized)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("oct3d_demo", REPO / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["oct3d_demo"] = module
    spec.loader.exec_module(module)
    return module


def test_ensure_data_creates_once(demo, tmp_path):
    root = tmp_path / "synthetic"
    assert demo.ensure_data(root, num_classes=2, train_per_class=1, val_per_class=1, test_per_class=1, frames=4,
                            size=16) is True
    assert (root / "annotations" / "train.csv").is_file()
    assert len(list((root / "test").rglob("*.mp4"))) == 2
    assert demo.ensure_data(root) is False


def test_held_out_clips_cover_every_class(demo, tiny_kinetics):
    clips = demo.held_out_clips(tiny_kinetics, 2)
    assert [label for _, label in clips] == ["moving left", "moving right"]
    assert all(path.parent.parent.name == "test" for path, _ in clips)


def test_demo_end_to_end_tiny(demo, tiny_kinetics, tmp_path, capsys):
    overrides = [
        "--data.num_workers", "0", "--data.batch_size", "2", "--data.num_frames", "4", "--data.crop_size", "32",
        "--data.min_short_side", "32", "--data.max_short_side", "36", "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]
    status = demo.main(["--data", str(tiny_kinetics), "--out", str(tmp_path / "logs"), "--clips", "3", "--",
                        *overrides])
    assert status == 0
    out = capsys.readouterr().out
    assert "held-out clips" in out
    assert "inference exit status 0" in out
    assert "/3 held-out clips correct" in out
    assert list((tmp_path / "logs").rglob("best-*.ckpt"))
