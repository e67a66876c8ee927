"""ImageNetDataModule on a tiny generated ImageFolder."""

from __future__ import annotations

import shutil

import pytest
import torch

from datamodules import ImageNetDataModule
from datamodules.imagenet import imagenet_eval_transform

CLASSES = ["n01440764", "n01443537", "n01484850"]


def _datamodule(root, **overrides) -> ImageNetDataModule:
    return ImageNetDataModule(
        str(root), **{"batch_size": 4, "num_workers": 0, "crop_size": 24, "resize_size": 32, **overrides}
    )


def test_classes_before_setup(tiny_imagefolder):
    datamodule = _datamodule(tiny_imagefolder)
    assert datamodule.num_classes == 3
    assert datamodule.class_names == CLASSES
    assert datamodule.datasets == {}


def test_train_and_val_batches(tiny_imagefolder):
    datamodule = _datamodule(tiny_imagefolder)
    train = next(iter(datamodule.train_dataloader()))
    assert set(train) == {"image", "label"}
    assert train["image"].shape == (4, 3, 24, 24) and train["image"].dtype == torch.float32
    assert train["label"].dtype == torch.long
    assert len(datamodule.datasets["train"]) == 12
    val = [batch for batch in datamodule.val_dataloader()]
    assert [b["image"].shape[0] for b in val] == [4, 2]
    assert torch.cat([b["label"] for b in val]).tolist() == [0, 0, 1, 1, 2, 2]
    # Validation is deterministic, and the test loader is the validation set.
    again = next(iter(datamodule.test_dataloader()))
    assert torch.equal(again["image"], val[0]["image"])


def test_eval_transform_resizes_short_side_then_center_crops():
    from PIL import Image

    image = Image.new("RGB", (64, 32), (255, 0, 0))
    tensor = imagenet_eval_transform(crop_size=16, resize_size=20)(image)
    assert tensor.shape == (3, 16, 16)
    assert torch.allclose(tensor[0], torch.full((16, 16), (1 - 0.485) / 0.229), atol=1e-5)


def test_val_classes_follow_train_classes(tiny_imagefolder, tmp_path):
    root = tmp_path / "imagenet"
    shutil.copytree(tiny_imagefolder, root)
    shutil.rmtree(root / "val" / CLASSES[0])  # val lacks a class: labels must still follow train's indices
    datamodule = _datamodule(root, batch_size=8)
    labels = next(iter(datamodule.val_dataloader()))["label"]
    assert labels.tolist() == [1, 1, 2, 2]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        _ = _datamodule(tmp_path).num_classes
    with pytest.raises(ValueError, match="resize_size"):
        _datamodule(tmp_path, crop_size=64)
    with pytest.raises(ValueError, match="batch_size"):
        _datamodule(tmp_path, batch_size=0)
