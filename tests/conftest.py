"""Shared fixtures: tiny datasets generated once per test session.

* ``tiny_kinetics``: a synthetic Kinetics-layout dataset (3 motion classes, 2 train / 1 val / 1 test
  video per class, 16 frames of 32x32 at 8 fps, real H.264 mp4).
* ``broken_kinetics``: the same plus, in the train split, one truncated video, one video listed in
  the CSV but absent on disk, and one text file named .mp4 (and one truncated video in val).
* ``tiny_imagefolder``: an ImageNet-layout folder (3 classes, 4 train / 2 val JPEGs per class, 40x36 px).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

# Lightning gives its loggers a stream handler on stderr when it is first imported. Imported here, before
# any test, that is the real stderr: first imported inside a test using capsys, the handler would keep
# the captured stream, and once it is closed every later log line prints "--- Logging error ---".
import lightning.pytorch  # noqa: F401
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Give every test the thread count the session started with: a tool run in-process (a
    benchmark, a data-loading measurement) sets its own, and PyTorch's CPU convolution dispatch,
    and so the memory format of some reference outputs, depends on it."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


TINY_KINETICS = dict(
    num_classes=3, train_per_class=2, val_per_class=1, test_per_class=1, frames=16, size=32, fps=8, seed=0
)
TINY_IMAGE_CLASSES = ("n01440764", "n01443537", "n01484850")


@pytest.fixture(scope="session")
def tiny_kinetics(tmp_path_factory) -> Path:
    """Root of a tiny synthetic Kinetics-layout dataset (see the module docstring); do not modify it."""
    from datamodules.synthetic import make_synthetic_kinetics

    root = tmp_path_factory.mktemp("data") / "tiny_kinetics"
    make_synthetic_kinetics(root, **TINY_KINETICS)
    return root


def _append_rows(csv_path: Path, rows: list[tuple]) -> None:
    with open(csv_path, "a", newline="") as handle:
        csv.writer(handle).writerows(rows)


@pytest.fixture(scope="session")
def broken_kinetics(tiny_kinetics, tmp_path_factory) -> Path:
    """``tiny_kinetics`` with unreadable videos added (see the module docstring); returns the root.

    The broken train entries are, as paths relative to the root:
    ``train/moving left/trunc000001_000000_000002.mp4`` (truncated copy of a real video),
    ``train/moving left/missng00002_000000_000002.mp4`` (in the CSV only),
    ``train/moving right/notvideo003_000000_000002.mp4`` (a text file);
    and in val ``val/moving up/truncval004_000000_000002.mp4``.
    """
    root = tmp_path_factory.mktemp("data") / "broken_kinetics"
    shutil.copytree(tiny_kinetics, root)
    source = next((root / "train" / "moving left").glob("*.mp4"))
    data = source.read_bytes()
    (root / "train" / "moving left" / "trunc000001_000000_000002.mp4").write_bytes(data[: len(data) // 2])
    (root / "train" / "moving right" / "notvideo003_000000_000002.mp4").write_text("this is not a video\n" * 20)
    (root / "val" / "moving up" / "truncval004_000000_000002.mp4").write_bytes(data[: len(data) // 3])
    _append_rows(
        root / "annotations" / "train.csv",
        [
            ("moving left", "trunc000001", 0, 2, "train"),
            ("moving left", "missng00002", 0, 2, "train"),
            ("moving right", "notvideo003", 0, 2, "train"),
        ],
    )
    _append_rows(root / "annotations" / "val.csv", [("moving up", "truncval004", 0, 2, "val")])
    return root


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    """Root of a tiny ImageNet-layout folder: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data") / "tiny_imagefolder"
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 2)):
        for class_index, wnid in enumerate(TINY_IMAGE_CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)
                pixels[..., class_index] = 255  # a class-colored tint, so a model could learn it
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="session")
def tiny_video_checkpoint(tiny_kinetics, tmp_path_factory) -> Path:
    """A one-step Oct-I3D (base width 8) checkpoint on the tiny dataset, written by a real Trainer."""
    import lightning.pytorch as pl
    import torch

    from datamodules import KineticsDataModule
    from oct3d.lightning import VideoClassifier

    torch.manual_seed(0)
    data = KineticsDataModule(str(tiny_kinetics), num_frames=4, sampling_rate=2, crop_size=32, min_short_side=32,
                              max_short_side=36, batch_size=2, num_workers=0)
    model = VideoClassifier(backbone="oct_i3d_r50", num_classes=data.num_classes,
                            backbone_kwargs={"alpha": 0.5, "base_width": 8, "depths": [1, 1, 1, 1]})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path
