"""Volumetric segmentation end to end: Decathlon-layout data, ``lightning fit``, checkpoints, ``oct3d segment``.

Every dataset here is written by the test itself with nibabel: tiny volumes (about 16^3 voxels)
with a ball and a box to segment, plus broken cases (a truncated file, an image/label shape
mismatch, a label value outside dataset.json's classes).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from datamodules.volume import (
    DecathlonCase,
    VolumeDataset,
    VolumeReadError,
    VolumeSegmentationDataModule,
    load_nifti,
    read_decathlon,
)
from oct3d import cli
from oct3d.inference import CheckpointError
from oct3d.lightning import VolumeSegmenter
from oct3d.segment import load_segmenter

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPE = (18, 16, 14)
AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.0, 0, 5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])
CLASSES = {"0": "background", "1": "ball", "2": "box"}


def _case(rng: np.random.Generator, channels: int) -> tuple[np.ndarray, np.ndarray]:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1)
    label = np.zeros(SHAPE, np.uint8)
    label[np.linalg.norm(grid - rng.uniform(5, np.array(SHAPE) - 5), axis=-1) < rng.uniform(3, 4.5)] = 1
    x, y, z = rng.integers(0, 4, 3)
    label[x : x + 4, y : y + 4, z : z + 4] = 2
    image = (2.0 + label + rng.normal(0, 0.3, SHAPE)).astype(np.float32)
    if channels > 1:
        image = np.stack([image * (k + 1) for k in range(channels)], -1)
    return image, label


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))


def make_tiny_decathlon(root: Path, cases: int = 6, channels: int = 1, broken: bool = True, seed: int = 0) -> Path:
    """A tiny Decathlon-layout dataset; with ``broken``, three bad training cases and a corrupt test volume."""
    rng = np.random.default_rng(seed)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(cases):
        image, label = _case(rng, channels)
        _save(image, root / "imagesTr" / f"case{i:02d}.nii.gz")
        _save(label, root / "labelsTr" / f"case{i:02d}.nii.gz")
        training.append({"image": f"./imagesTr/case{i:02d}.nii.gz", "label": f"./labelsTr/case{i:02d}.nii.gz"})
    test = []
    for i in range(2):
        _save(_case(rng, channels)[0], root / "imagesTs" / f"test{i:02d}.nii.gz")
        test.append(f"./imagesTs/test{i:02d}.nii.gz")
    if broken:
        image, label = _case(rng, channels)
        good = (root / "imagesTr" / "case00.nii.gz").read_bytes()
        (root / "imagesTr" / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
        _save(label, root / "labelsTr" / "truncated.nii.gz")
        _save(image, root / "imagesTr" / "mismatch.nii.gz")
        _save(label[:, :, :-2], root / "labelsTr" / "mismatch.nii.gz")
        _save(image, root / "imagesTr" / "badlabel.nii.gz")
        _save(np.where(label == 2, 7, label).astype(np.uint8), root / "labelsTr" / "badlabel.nii.gz")
        training += [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
                     for n in ("truncated", "mismatch", "badlabel")]
        (root / "imagesTs" / "corrupt.nii.gz").write_bytes(b"not a nifti file\n" * 50)
        test.append("./imagesTs/corrupt.nii.gz")
    meta = {"name": "Tiny", "modality": {str(k): f"mod{k}" for k in range(channels)}, "labels": CLASSES,
            "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def tiny_decathlon(tmp_path_factory) -> Path:
    return make_tiny_decathlon(tmp_path_factory.mktemp("data") / "tiny_decathlon")


def test_reads_the_layout_and_splits_reproducibly(tiny_decathlon):
    info = read_decathlon(tiny_decathlon)
    assert info.class_names == ["background", "ball", "box"] and info.modalities == ["mod0"]
    assert len(info.training) == 9 and len(info.test) == 3 and info.test[0].label is None
    data = VolumeSegmentationDataModule(str(tiny_decathlon), patch_size=(8, 8, 8), val_fraction=0.25, split_seed=3)
    assert (data.num_classes, data.in_channels) == (3, 1)
    train, val = data.split_cases()
    again = VolumeSegmentationDataModule(str(tiny_decathlon), val_fraction=0.25, split_seed=3).split_cases()
    assert (train, val) == again and len(val) == 2 and not set(train) & set(val)
    other = VolumeSegmentationDataModule(str(tiny_decathlon), val_fraction=0.25, split_seed=4).split_cases()[1]
    assert other != val
    folds = [VolumeSegmentationDataModule(str(tiny_decathlon), fold=f, num_folds=3).split_cases()[1] for f in range(3)]
    assert sorted(c.image for fold in folds for c in fold) == sorted(c.image for c in info.training)
    with pytest.raises(ValueError, match="num_folds=20 exceeds the 9 training cases"):
        VolumeSegmentationDataModule(str(tiny_decathlon), fold=1, num_folds=20).split_cases()


def test_bad_volumes_are_reported_by_name_and_never_fatal(tiny_decathlon):
    info = read_decathlon(tiny_decathlon)
    prep = {"normalization": "zscore", "nonzero": True}
    bad = info.training[6:]
    val = VolumeDataset(bad, "val", 1, 3, prep, cache_rate=1.0)
    reasons = [val[i]["failed"] for i in range(3)]
    assert all(not val[i]["valid"] and val[i]["image"].numel() == 0 for i in range(3))
    assert "truncated.nii.gz: unreadable" in reasons[0]
    assert "mismatch.nii.gz: label shape (18, 16, 12) differs from image shape (18, 16, 14)" in reasons[1]
    assert "badlabel.nii.gz: label values 7 outside dataset.json's classes 0..2" in reasons[2]
    # Training replaces a bad case by a good one and says which case it replaced.
    train = VolumeDataset([info.training[0], *bad], "train", 1, 3, prep, patch_size=(8, 8, 8), cache_rate=0.0)
    items = [train[i] for i in range(4)]
    assert all(item["image"].shape == (1, 8, 8, 8) and item["label"].shape == (1, 8, 8, 8) for item in items)
    assert [bool(item["failed"]) for item in items] == [False, True, True, True]
    assert {item["case"] for item in items} == {"case00"}
    with pytest.raises(RuntimeError, match="no readable case"):
        VolumeDataset(bad, "train", 1, 3, prep, patch_size=(8, 8, 8), cache_rate=0.0)[0]


def test_a_label_placed_elsewhere_in_space_is_reported(tmp_path):
    root = make_tiny_decathlon(tmp_path / "shifted", cases=2, broken=False)
    image, label = _case(np.random.default_rng(1), 1)
    _save(image, root / "imagesTr" / "shifted.nii.gz")
    moved = AFFINE.copy()
    moved[0, 3] += 30.0  # same shape, another origin: the label of another scan
    nib.save(nib.Nifti1Image(label, moved), str(root / "labelsTr" / "shifted.nii.gz"))
    case = DecathlonCase(str(root / "imagesTr" / "shifted.nii.gz"), str(root / "labelsTr" / "shifted.nii.gz"))
    item = VolumeDataset([case], "val", 1, 3, {"normalization": "zscore"}, cache_rate=0.0)[0]
    assert not item["valid"] and "shifted.nii.gz: label geometry (affine) differs from its image's (largest entry " \
        "difference 30)" in item["failed"]
    bare = nib.Nifti1Image(label, None)  # a mask written from an array: no geometry in its header
    bare.header.set_sform(None, code=0)
    bare.header.set_qform(None, code=0)
    nib.save(bare, str(root / "labelsTr" / "shifted.nii.gz"))
    assert VolumeDataset([case], "val", 1, 3, {"normalization": "zscore"}, cache_rate=0.0)[0]["valid"]


def test_a_test_split_mixing_labelled_and_unlabelled_cases_keeps_each_label_on_its_grid(tiny_decathlon):
    info = read_decathlon(tiny_decathlon)
    cases = [info.training[0], info.test[0], info.training[1]]  # labelled, unlabelled, labelled
    prep = {"normalization": "zscore", "spacing": [1.5, 1.5, 2.0]}
    data = VolumeDataset(cases, "test", 1, 3, prep, cache_rate=0.0)
    items = [data[i] for i in range(3)]
    assert all(item["valid"] for item in items)
    for item in (items[0], items[2]):  # the image resampled, the label on the file's grid, both grids given
        assert item["label"].shape[1:] == SHAPE != item["image"].shape[1:]
        assert item["affine_original"].shape == item["affine_resampled"].shape == (4, 4)
    assert items[1]["label"].numel() == 0 and "affine_resampled" not in items[1]


def test_multichannel_4d_volumes_and_fg_sampling(tmp_path):
    root = make_tiny_decathlon(tmp_path / "four_d", cases=3, channels=2, broken=False)
    image, affine = load_nifti(root / "imagesTr" / "case00.nii.gz")
    assert image.shape == (2, *SHAPE) and np.allclose(affine, AFFINE)
    with pytest.raises(VolumeReadError, match="has 2 channel"):
        load_nifti(root / "imagesTr" / "case00.nii.gz", channels=4)
    # The same channels as a NIfTI vector image (X, Y, Z, 1, C).
    vector = np.moveaxis(image, 0, -1)[:, :, :, None, :]
    _save(vector, tmp_path / "vector.nii.gz")
    again, _ = load_nifti(tmp_path / "vector.nii.gz", channels=2)
    assert np.array_equal(again, image)
    data = VolumeSegmentationDataModule(str(root), patch_size=(6, 6, 6), fg_ratio=1.0, val_fraction=0.34,
                                        augment=False, num_workers=0)
    data.setup("fit")
    assert data.in_channels == 2
    torch.manual_seed(0)
    patches = [data.datasets["train"][i] for i in range(8)]
    # fg_ratio=1: every patch is centred on a foreground voxel.
    assert all(p["label"][0, 3, 3, 3] > 0 for p in patches)
    assert all(p["image"].shape == (2, 6, 6, 6) for p in patches)
    # Channel-wise z-score over nonzero voxels.
    whole = data.datasets["val"][0]["image"]
    assert torch.allclose(whole.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-4)
    # A 2-channel model segments a 4D file into a 3D label map.
    import lightning.pytorch as pl

    model = VolumeSegmenter(in_channels=2, num_classes=3, backbone_kwargs={"alpha": 0.5, "base_width": 4, "depth": 2})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    assert cli.main(["segment", "--checkpoint", str(tmp_path / "two.ckpt"), "--output-dir", str(tmp_path / "seg"),
                     str(root / "imagesTs" / "test00.nii.gz")]) == 0
    written = nib.load(str(tmp_path / "seg" / "test00.nii.gz"))
    assert written.shape == SHAPE and np.allclose(written.affine, AFFINE)


def test_bad_arguments_name_the_argument(tiny_decathlon):
    for kwargs, message in (({"patch_size": (8, 8)}, "patch_size"), ({"fg_ratio": 1.5}, "fg_ratio"),
                            ({"normalization": "window"}, "window"), ({"fold": 5}, "fold")):
        with pytest.raises(ValueError, match=message):
            VolumeSegmentationDataModule(str(tiny_decathlon), **kwargs)
    for kwargs, message in (({"num_classes": 1}, "num_classes"), ({"depth_axis": 3}, "depth_axis"),
                            ({"backbone": "no_such_model"}, "unknown model"),
                            ({"backbone_kwargs": {"in_channels": 2}}, "in_channels"),
                            ({"preprocessing": {"patch_size": [16, 16]}}, r"preprocessing\['patch_size'\] must be 3"),
                            ({"preprocessing": {"patch_size": [16, 16, 16.5]}}, "patch_size"),
                            ({"preprocessing": {"normalization": "zsc"}}, r"preprocessing\['normalization'\]"),
                            ({"preprocessing": {"spacing": [1, 1]}}, r"preprocessing\['spacing'\]"),
                            ({"preprocessing": {"normalization": "window"}}, r"preprocessing\['window'\]"),
                            ({"preprocessing": {"patch": [8, 8, 8]}}, r"unknown keys \['patch'\]")):
        with pytest.raises(ValueError, match=message):
            VolumeSegmenter(**kwargs)
    with pytest.raises(FileNotFoundError, match=r"dataset\.json"):
        VolumeSegmentationDataModule(str(tiny_decathlon / "imagesTr")).num_classes
    # Scalars where triples belong, a window that would be ignored, a zoom range past 1.
    for kwargs, message in (({"patch_size": 32}, r"patch_size must be 3 positive ints .* got 32"),
                            ({"spacing": 1.5}, r"spacing must be 3 positive voxel sizes .* got 1\.5"),
                            ({"window": [-175, 250]}, r"window=\[-175, 250\] applies only with normalization='window'"),
                            ({"scale_range": 2.0}, "scale_range must be in"),
                            ({"rotate_degrees": -5.0}, "rotate_degrees")):
        with pytest.raises(ValueError, match=message):
            VolumeSegmentationDataModule(str(tiny_decathlon), **kwargs)


def test_a_backbone_whose_channels_disagree_with_the_data_is_refused_at_construction():
    spec = {"class_path": "monai.networks.nets.UNet", "init_args": TINY_UNET}
    # The backbone names 3 classes (TINY_UNET's out_channels); the data has 2.
    with pytest.raises(ValueError, match=r"init_args\.out_channels is 3 but the model has num_classes=2"):
        VolumeSegmenter(backbone=spec, num_classes=2)
    with pytest.raises(ValueError, match=r"set model\.init_args\.backbone\.init_args\.in_channels: 2"):
        VolumeSegmenter(backbone=spec, num_classes=3, in_channels=2)
    assert VolumeSegmenter(backbone=spec, num_classes=3).model is not None


def test_failed_volumes_count_volumes_not_patches():
    model = VolumeSegmenter(num_classes=3, backbone_kwargs={"alpha": 0.5, "base_width": 4, "depth": 2})
    logged = []
    model.log = lambda key, value, **kwargs: logged.append((key, value))
    bad = "labelsTr/badlabel.nii.gz: label values 7 outside dataset.json's classes 0..2"
    model.on_train_epoch_start()
    # Two patches of one bad case in the first batch, a third in the next: one volume.
    for failed in ([bad, "", bad], ["", bad], ["", ""]):
        model._log_failed({"failed": failed}, "train")
    assert sum(value for key, value in logged if key == "train/failed_volumes") == 1
    model.on_train_epoch_start()  # a new epoch counts it again
    model._log_failed({"failed": [bad]}, "train")
    assert sum(value for key, value in logged if key == "train/failed_volumes") == 2


def test_a_test_run_without_labels_says_why_there_is_no_dice():
    model = VolumeSegmenter(num_classes=3, backbone_kwargs={"alpha": 0.5, "base_width": 4, "depth": 2})
    model.on_test_epoch_start()
    with pytest.warns(UserWarning, match="no test Dice.*oct3d segment"):
        model.on_test_epoch_end()


def test_find_volumes_skips_dot_files(tmp_path):
    from oct3d.segment import find_volumes

    for name in ("case.nii.gz", "._case.nii.gz", ".hidden.nii"):
        (tmp_path / name).write_bytes(b"")
    assert [str(relative) for _, relative in find_volumes([tmp_path])] == ["case.nii.gz"]


def test_label_errors_say_what_is_wrong(tmp_path):
    root = make_tiny_decathlon(tmp_path / "data", cases=2, broken=False)
    info = read_decathlon(root)
    label = np.asarray(nib.load(str(root / "labelsTr" / "case00.nii.gz")).dataobj).astype(np.float32)
    _save(label + 1e-6 * (label > 0), root / "labelsTr" / "case00.nii.gz")  # a resampled-looking label
    (root / "labelsTr" / "case01.nii.gz").unlink()
    (root / "labelsTr" / "case01.nii.gz").mkdir()  # a folder where the file should be
    val = VolumeDataset(info.training, "val", 1, 3, {"normalization": "zscore", "nonzero": True}, cache_rate=0.0)
    assert "non-integer label values 1.000001" in val[0]["failed"]
    assert "case01.nii.gz: a folder, not a file" in val[1]["failed"]
    _save(np.stack([label, label], -1), root / "labelsTr" / "case00.nii.gz")  # a two-component label map
    val = VolumeDataset(info.training, "val", 1, 3, {"normalization": "zscore", "nonzero": True}, cache_rate=0.0)
    assert "is a label map with 2 components; expected one channel" in val[0]["failed"]


def test_ct_window_and_channel_check(tiny_decathlon):
    import lightning.pytorch as pl
    from monai.data import MetaTensor

    from datamodules.volume import preprocess_transform

    hu = torch.tensor([-1000.0, -175.0, 37.5, 250.0, 3000.0]).view(1, 5, 1, 1)
    window = preprocess_transform({"normalization": "window", "window": [-175, 250]}, with_label=False)
    assert torch.allclose(window({"image": MetaTensor(hu)})["image"].flatten(), torch.tensor([0, 0, 0.5, 1, 1.0]))
    data = VolumeSegmentationDataModule(str(tiny_decathlon), patch_size=(8, 8, 8), num_workers=0, cache_rate=0.0)
    model = VolumeSegmenter(in_channels=2, num_classes=3, backbone_kwargs={"alpha": 0.5, "base_width": 4, "depth": 2})
    trainer = pl.Trainer(accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with pytest.raises(ValueError, match="in_channels: 1"):
        trainer.fit(model, datamodule=data)


def test_depth_axis_puts_the_slice_axis_first():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return x.repeat(1, 2, 1, 1, 1)

    model = VolumeSegmenter(backbone=Probe(), num_classes=2, depth_axis=2)
    x = torch.randn(1, 1, 5, 6, 7)
    assert torch.equal(model(x), x.repeat(1, 2, 1, 1, 1)) and seen == [(1, 1, 7, 5, 6)]


def _fit_args(root: Path, out: Path) -> list[str]:
    # The demo config shrunk to tiny volumes: 2 epochs of a 2-level width-4 Oct-UNet3d on 12^3 patches.
    return [
        "fit", "-c", str(CONFIGS / "oct_unet3d_demo.yaml"), "--data.root", str(root),
        "--data.patch_size", "[12, 12, 12]", "--data.num_workers", "0", "--data.samples_per_volume", "2",
        "--data.val_fraction", "0.34", "--data.spacing", "[1.5, 1.5, 2.0]",
        "--model.init_args.backbone_kwargs", '{"alpha": 0.5, "octave": "spatial", "base_width": 4, "depth": 2}',
        "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger", "false",
    ]


@pytest.fixture(scope="module")
def fitted(tiny_decathlon, tmp_path_factory):
    """``lightning fit`` with the demo config on the tiny dataset; returns (run folder, report lines)."""
    out = tmp_path_factory.mktemp("fit")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch.datamodules")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        cli.main(_fit_args(tiny_decathlon, out))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    return out, records


def test_val_fraction_zero_trains_on_every_case_without_validation(tiny_decathlon, tmp_path):
    data = VolumeSegmentationDataModule(str(tiny_decathlon), patch_size=(8, 8, 8), val_fraction=0.0, num_workers=0)
    data.setup()  # every stage: no validation split to build
    assert data.val_dataloader() == []
    with pytest.raises(ValueError, match="val_fraction=0 holds out no validation cases"):
        VolumeSegmentationDataModule(str(tiny_decathlon), val_fraction=0.0).setup("validate")
    args = [a if a != "0.34" else "0.0" for a in _fit_args(tiny_decathlon, tmp_path)]
    args[args.index("--trainer.max_epochs") + 1] = "1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.main(args)
    assert not [w for w in caught if "could not find the monitored key" in str(w.message)]  # nothing to rank by
    (last,) = tmp_path.rglob("*.ckpt")  # last.ckpt only
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0 and state["global_step"] > 0
    assert not list(tmp_path.rglob("best-*.ckpt"))  # nothing validated, so no best checkpoint


def test_fit_reports_bad_volumes_and_writes_a_complete_checkpoint(fitted):
    out, records = fitted
    # The three bad training cases are reported by file name (whichever split the seed put them in).
    reported = " ".join(records)
    assert "unusable volume" in reported
    for name in ("truncated.nii.gz", "mismatch.nii.gz", "badlabel.nii.gz"):
        assert name in reported
    best = sorted(out.rglob("best-*.ckpt"))
    assert best and list(out.rglob("last.ckpt"))
    checkpoint = torch.load(best[0], map_location="cpu", weights_only=True)
    meta = checkpoint["oct3d"]
    assert meta["task"] == "segmentation" and meta["backbone"] == "oct_unet3d"
    assert meta["class_names"] == ["background", "ball", "box"] and meta["num_classes"] == 3
    prep = meta["preprocessing"]
    assert prep["patch_size"] == [12, 12, 12] and prep["spacing"] == [1.5, 1.5, 2.0]
    assert prep["normalization"] == "zscore" and prep["modalities"] == ["mod0"]
    assert meta["backbone_kwargs"]["alpha"] == 0.5 and 0 <= float(checkpoint["callbacks"][next(
        k for k in checkpoint["callbacks"] if k.startswith("ModelCheckpoint"))]["best_model_score"]) <= 1


def test_segment_writes_label_maps_with_the_input_geometry(fitted, tiny_decathlon, tmp_path, capsys):
    out, _ = fitted
    checkpoint = sorted(out.rglob("best-*.ckpt"))[0]
    lines = tmp_path / "seg.jsonl"
    status = cli.main(["segment", "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "seg"),
                       "--output", str(lines), str(tiny_decathlon / "imagesTs"),
                       str(tiny_decathlon / "imagesTr" / "case01.nii.gz"), str(tmp_path / "missing.nii.gz")])
    assert status == 1  # one corrupt input, one missing
    results = [json.loads(line) for line in lines.read_text().splitlines()]
    assert len(results) == 5
    errors = [r for r in results if "error" in r]
    assert len(errors) == 2 and errors[0] == {"path": str(tmp_path / "missing.nii.gz"), "error": "does not exist"}
    assert "corrupt.nii.gz: unreadable" in errors[1]["error"]
    assert not (tmp_path / "seg" / "corrupt.nii.gz").exists()
    assert "2 of 5 files failed" in capsys.readouterr().err
    for result in results:
        if "error" in result:
            continue
        source, written = nib.load(result["path"]), nib.load(result["output"])
        assert Path(result["output"]).name == Path(result["path"]).name
        assert written.shape == source.shape == SHAPE
        assert np.allclose(written.affine, source.affine) and written.get_data_dtype() == np.uint8
        assert written.header.get_zooms() == source.header.get_zooms()
        # A label map's own display range and intent, not the image's.
        assert written.header.get_intent()[0] == "label"
        assert (float(written.header["cal_min"]), float(written.header["cal_max"])) == (0.0, 2.0)
        labels = np.asarray(written.dataobj)
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
        assert sum(result["voxels"].values()) == labels.size
    assert not list((tmp_path / "seg").glob(".partial-*"))


def test_segment_mirroring_batch_size_and_probability_maps(fitted, tiny_decathlon, tmp_path):
    from oct3d.segment import load_segmenter

    out, _ = fitted
    checkpoint = sorted(out.rglob("best-*.ckpt"))[0]
    volume = tiny_decathlon / "imagesTr" / "case01.nii.gz"
    lines = tmp_path / "seg.jsonl"
    assert cli.main(["segment", "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "seg"), "--mirror",
                     "--sw-batch-size", "3", "--save-probabilities", "--output", str(lines), str(volume)]) == 0
    (result,) = [json.loads(line) for line in lines.read_text().splitlines()]
    maps = nib.load(result["probabilities"])
    assert maps.shape == (*SHAPE, 3) and maps.get_data_dtype() == np.float32
    assert maps.header.get_intent()[0] == "none" and float(maps.header["cal_max"]) == 1.0
    assert not list((tmp_path / "seg").glob(".partial-*"))
    probs = np.asarray(maps.dataobj)
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-4)
    assert (probs.argmax(-1) == np.asarray(nib.load(result["output"]).dataobj)).all()
    # Mirroring averages the eight flipped passes: not the plain pass, and the same whatever the window batch.
    segmenter = load_segmenter(checkpoint, "cpu")
    plain, _ = segmenter.probabilities(volume)
    mirrored, _ = segmenter.probabilities(volume, mirror=True, sw_batch_size=1)
    assert torch.allclose(mirrored, torch.from_numpy(np.moveaxis(probs, -1, 0)), atol=1e-5)
    assert not torch.allclose(plain, mirrored, atol=1e-6)


def test_segment_never_overwrites_or_resegments_its_inputs(fitted, tiny_decathlon, tmp_path, capsys):
    out, _ = fitted
    checkpoint = str(sorted(out.rglob("best-*.ckpt"))[0])
    scans = tmp_path / "scans"
    shutil.copytree(tiny_decathlon / "imagesTs", scans)
    before = {p: p.read_bytes() for p in scans.iterdir()}
    assert cli.main(["segment", "--checkpoint", checkpoint, "--output-dir", str(scans), str(scans)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in scans.iterdir()} == before
    runs = []
    for _ in range(2):  # the label maps of the first run sit inside the searched folder
        lines = tmp_path / f"run{len(runs)}.jsonl"
        cli.main(["segment", "--checkpoint", checkpoint, "--output-dir", str(scans / "seg"), "--output", str(lines),
                  str(scans)])
        runs.append(sorted(json.loads(line)["path"] for line in lines.read_text().splitlines()))
    assert runs[0] == runs[1] and all("/seg/" not in path for path in runs[1])
    # The JSON lines file may not be an input either, nor --output-dir a file; a run folder as the
    # checkpoint is named as a folder.
    scan = sorted(scans.glob("*.nii.gz"))[0]
    for args, why in (
        (["--output-dir", str(tmp_path / "seg2"), "--output", str(scan), str(scan)], "also an input"),
        (["--output-dir", str(scan), str(scan)], "is a file"),
    ):
        with pytest.raises(SystemExit):
            cli.main(["segment", "--checkpoint", checkpoint, *args])
        assert why in capsys.readouterr().err
    assert cli.main(["segment", "--checkpoint", str(out), "--output-dir", str(tmp_path / "seg3"), str(scan)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in scans.iterdir() if p.is_file()} == before


def test_any_module_backbone_trains_and_reloads(tiny_decathlon, tmp_path):
    import lightning.pytorch as pl

    data = VolumeSegmentationDataModule(str(tiny_decathlon), patch_size=(8, 8, 8), num_workers=0, batch_size=2,
                                        samples_per_volume=1, val_fraction=0.34)
    spec = {"class_path": "monai.networks.nets.UNet",
            "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2]}}
    for backbone in (spec, __import__("monai").networks.nets.UNet(**spec["init_args"])):
        model = VolumeSegmenter(backbone=backbone, num_classes=3)
        trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, datamodule=data)
        path = tmp_path / f"{type(backbone).__name__}.ckpt"
        trainer.save_checkpoint(path)
        if isinstance(backbone, dict):
            segmenter = load_segmenter(path, device="cpu")
            assert type(segmenter.module.model).__name__ == "UNet"
            x = torch.randn(1, 1, 8, 8, 8)
            assert torch.allclose(segmenter.module(x), model.eval()(x), atol=1e-5)
        else:
            with pytest.raises(CheckpointError, match="constructor arguments are unknown"):
                load_segmenter(path, device="cpu")


def test_foreign_checkpoint_is_a_clear_error(tmp_path, tiny_decathlon, capsys):
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, path)
    assert cli.main(["segment", "--checkpoint", str(path), "--output-dir", str(tmp_path),
                     str(tiny_decathlon / "imagesTs")]) == 2
    assert "not an oct3d checkpoint" in capsys.readouterr().err


def test_mixed_precision_training_steps(tiny_decathlon):
    import lightning.pytorch as pl

    data = VolumeSegmentationDataModule(str(tiny_decathlon), patch_size=(8, 8, 8), num_workers=0, batch_size=2,
                                        samples_per_volume=1, val_fraction=0.34)
    model = VolumeSegmenter(num_classes=3, backbone_kwargs={"alpha": 0.5, "base_width": 4, "depth": 2})
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_epochs=1, limit_train_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert 0 <= float(trainer.callback_metrics["val/dice"]) <= 1
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def _fake_template(folder: Path, shape=(40, 72, 36)) -> Path:
    """A stand-in for the MNI152 files: an ellipsoid 'brain' with a white-matter core, uint8 like nilearn's."""
    from datamodules.mni_tissue import MNI_FILES

    folder.mkdir(parents=True)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    radius = np.linalg.norm(grid / np.array([0.9, 0.95, 0.9]), axis=-1)
    wm = np.clip(1.5 - 3 * radius, 0, 1)
    gm = np.clip(1 - wm, 0, 1) * (radius < 0.85)
    t1 = 100 * gm + 200 * wm
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-20, -36, -18]
    for role, array in (("t1", t1), ("gm", 255 * gm), ("wm", 255 * wm)):
        nib.save(nib.Nifti1Image(np.round(array).astype(np.uint8), affine), str(folder / MNI_FILES[role]))
    return folder


def test_mni_tissue_dataset_has_disjoint_regions(tmp_path):
    from datamodules.mni_tissue import find_mni_template, make_mni_tissue

    template = _fake_template(tmp_path / "template")
    summary = make_mni_tissue(tmp_path / "mni", train_cases=3, test_cases=2, crop_size=(16, 16, 16), gap=4,
                              template_dir=template)
    assert summary.train_y[1] + 4 <= summary.test_y[0]
    info = read_decathlon(tmp_path / "mni")
    assert info.class_names == ["background", "gray matter", "white matter"] and info.modalities == ["T1"]
    assert len(info.training) == 3 and len(info.test) == 2 and all(c.label for c in info.test)
    t1_affine = nib.load(str(template / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")).affine
    for cases, (start, stop) in ((info.training, summary.train_y), (info.test, summary.test_y)):
        for case in cases:
            image, label = nib.load(case.image), nib.load(case.label)
            assert image.shape == label.shape == (16, 16, 16)
            assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}
            # Where the crop sits in the template (Y voxels): inside its own region.
            y0 = (image.affine[1, 3] - t1_affine[1, 3]) / t1_affine[1, 1]
            assert start <= y0 and y0 + 16 <= stop
    assert sum(summary.label_fractions) == pytest.approx(1.0) and min(summary.label_fractions) > 0
    with pytest.raises(FileNotFoundError, match="not found"):
        find_mni_template(tmp_path)
    # A smaller rerun into the same folder leaves none of the earlier cases behind.
    make_mni_tissue(tmp_path / "mni", train_cases=1, test_cases=1, crop_size=(16, 16, 16), gap=4,
                    template_dir=template)
    assert len(list((tmp_path / "mni" / "imagesTr").iterdir())) == 1
    assert len(list((tmp_path / "mni" / "imagesTs").iterdir())) == 1
    with pytest.raises(ValueError, match="larger than the template"):
        make_mni_tissue(tmp_path / "big", crop_size=(300, 16, 16), template_dir=template)


def test_segmentation_benchmark_tables():
    from oct3d.segmentation_benchmark import StepCost, format_sweep, largest_patch, measure_steps

    steps = measure_steps([0.0, 0.5], patch=8, batch_size=1, base_width=4, depth=2, warmup=1, rounds=1)
    assert [s.alpha for s in steps] == [0.0, 0.5] and all(s.median_ms > 0 and s.peak_bytes > 0 for s in steps)
    # Octave maps hold a quarter of their low channels' voxels, so the step allocates less.
    assert steps[1].peak_bytes < steps[0].peak_bytes
    costs = [StepCost(a, p, 2, None, int(m * 2**20)) for a, p, m in
             ((0.0, 32, 40), (0.5, 32, 30), (0.0, 48, 150), (0.5, 48, 100), (0.0, 64, 400), (0.5, 64, 300))]
    assert largest_patch(costs, 0.0, 128 * 2**20) == 32 and largest_patch(costs, 0.5, 128 * 2**20) == 48
    assert largest_patch(costs, 0.0, 10 * 2**20) is None
    table = format_sweep(costs, [0.0, 0.5], [128, 512])
    assert "| 128 MiB | 32^3 (33 K voxels) | 48^3 (111 K voxels) |" in table


# ----------------------------------------------------------------------------- octavize'd backbones
TINY_UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8, 16], "strides": [2, 2],
             "num_res_units": 1}


def test_octavized_monai_unet_reloads_as_the_trained_network(tiny_decathlon, tmp_path):
    import lightning.pytorch as pl

    data = VolumeSegmentationDataModule(str(tiny_decathlon), patch_size=(12, 12, 8), num_workers=0, batch_size=2,
                                        samples_per_volume=1, val_fraction=0.34, augment=False)
    spec = {"class_path": "monai.networks.nets.UNet", "init_args": TINY_UNET}
    # depth_axis=2: the network sees (Z, X, Y) = (8, 12, 12), and so does octavize's example input.
    model = VolumeSegmenter(backbone=spec, num_classes=3, depth_axis=2, octavize={"alpha": 0.5, "octave": "spatial"})
    assert type(model.model).__name__ == "UNet"  # converted at fit start, when the patch size is known
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    plan = model.model.octave_plan
    assert any(a_out > 0 for _, a_out, _ in plan.values()), plan  # some convolutions really carry octaves
    path = tmp_path / "octave_unet.ckpt"
    trainer.save_checkpoint(path)
    meta = torch.load(path, map_location="cpu", weights_only=True)["oct3d"]
    assert meta["octavize"] == {"alpha": 0.5, "octave": "spatial", "exclude": [], "pool_first": None,
                                "vanilla_coarsest": True, "validate": True, "example_size": [12, 12, 8]}
    assert meta["backbone"] == spec
    segmenter = load_segmenter(path, device="cpu")
    rebuilt = segmenter.module.model
    assert rebuilt.octave_plan == plan
    assert list(rebuilt.state_dict()) == list(model.model.state_dict())
    x = torch.randn(1, 1, 12, 12, 8)
    assert torch.allclose(segmenter.module(x), model.eval()(x), atol=1e-5)
    # A module built with other settings refuses the checkpoint instead of loading mismatched weights.
    with pytest.raises(ValueError, match="converted with octavize"):
        VolumeSegmenter.load_from_checkpoint(path, weights_only=True, octavize=0.25)


def test_octavize_config_fits_and_segments(tiny_decathlon, tmp_path):
    out = tmp_path / "fit"
    # The demo config shrunk: a 3-level width-4 MONAI UNet, 3 steps on 12^3 patches.
    backbone = json.dumps({"class_path": "monai.networks.nets.UNet", "init_args": TINY_UNET})
    cli.main([
        "fit", "-c", str(CONFIGS / "monai_unet_octave_demo.yaml"), "--data.root", str(tiny_decathlon),
        "--data.patch_size", "[12, 12, 12]", "--data.num_workers", "0", "--data.val_fraction", "0.34",
        "--model.init_args.backbone", backbone,
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger", "false",
    ])
    checkpoint = sorted(out.rglob("best-*.ckpt"))[0]
    loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    meta = loaded["oct3d"]
    assert meta["backbone"]["class_path"] == "monai.networks.nets.UNet"
    assert meta["octavize"]["alpha"] == 0.5 and meta["octavize"]["example_size"] == [12, 12, 12]
    trained_keys = [k for k in loaded["state_dict"] if k.startswith("model.")]
    assert any(".h2l." in k for k in trained_keys)
    assert ["model." + k for k in load_segmenter(checkpoint, device="cpu").module.model.state_dict()] == trained_keys
    status = cli.main(["segment", "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "seg"),
                       "--output", str(tmp_path / "seg.jsonl"), str(tiny_decathlon / "imagesTs")])
    assert status == 1  # the corrupt test volume
    results = [json.loads(line) for line in (tmp_path / "seg.jsonl").read_text().splitlines()]
    written = [r for r in results if "error" not in r]
    assert len(written) == 2 and len(results) == 3
    for result in written:
        labels = nib.load(result["output"])
        assert labels.shape == SHAPE and np.allclose(labels.affine, AFFINE)
        assert labels.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(labels.dataobj))) <= {0, 1, 2}


def test_octavize_bad_settings_are_clear_errors():
    spec = {"class_path": "monai.networks.nets.UNet", "init_args": TINY_UNET}
    for octavize, message in ((1.0, r"alpha .* \[0, 1\)"), (True, "alpha"), ({"ratio": 0.5}, "unknown key"),
                              ({"octave": "temporal"}, "octave must be one of"),
                              ({"example_size": [8, 8]}, "example_size")):
        with pytest.raises(ValueError, match=message):
            VolumeSegmenter(backbone=spec, num_classes=3, octavize=octavize)
    # A command-line override of one init_arg lands beside init_args; it is an error, not silently dropped.
    with pytest.raises(ValueError, match=r"\['channels'\] beside class_path/init_args"):
        VolumeSegmenter(backbone={**spec, "channels": [2, 4, 8]}, num_classes=3)
    with pytest.raises(ValueError, match="already has octave layers"):
        VolumeSegmenter(num_classes=3, backbone_kwargs={"alpha": 0.0, "base_width": 4, "depth": 2}, octavize=0.5)
    # Without a patch size the conversion waits for the data module; using the module before is an error.
    model = VolumeSegmenter(backbone=spec, num_classes=3, octavize=0.5)
    with pytest.raises(RuntimeError, match="not octavized yet"):
        model(torch.zeros(1, 1, 8, 8, 8))
    converted = VolumeSegmenter(backbone=spec, num_classes=3, octavize=0.5, preprocessing={"patch_size": [8, 8, 8]})
    with pytest.raises(ValueError, match="already has octave layers"):
        VolumeSegmenter(backbone=converted.model, num_classes=3, octavize=0.5)


def test_checkpoints_record_every_builder_argument_and_format_1_still_loads(tmp_path):
    """backbone_kwargs are stored complete, so a later change of a builder default cannot change the
    rebuilt network; a format-1 checkpoint (arguments as given, oct_unet3d's old base_width 16) still loads."""
    model = VolumeSegmenter(num_classes=3, backbone_kwargs={"alpha": 0.5, "base_width": 16, "depth": 2},
                            preprocessing={"patch_size": [8, 8, 8]})
    assert model.hparams.backbone_kwargs == {"alpha": 0.5, "octave": "spatial", "base_width": 16, "depth": 2,
                                             "channels_last": None, "norm": "batch"}
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["oct3d"]["backbone_kwargs"] == model.hparams.backbone_kwargs
    assert checkpoint["oct3d"]["format_version"] == 2
    checkpoint["oct3d"].update(format_version=1, backbone_kwargs={"alpha": 0.5, "depth": 2})
    path = tmp_path / "format1.ckpt"
    torch.save(checkpoint, path)
    segmenter = load_segmenter(path, device="cpu")
    assert segmenter.module.model.encoder[0][0][0].h2h.in_channels == 1
    assert segmenter.module.model.encoder[0][0][0].out_channels == 16
    x = torch.randn(1, 1, 8, 8, 8)
    assert torch.allclose(segmenter.module(x), model.eval()(x), atol=1e-5)
    # Lightning's own loading (load_from_checkpoint, --ckpt_path) names the fix instead of a size mismatch.
    import lightning

    lightning_checkpoint = {**checkpoint, "pytorch-lightning_version": lightning.__version__,
                            "hyper_parameters": {**model.hparams, "backbone_kwargs": {"alpha": 0.5, "depth": 2}}}
    torch.save(lightning_checkpoint, path)
    with pytest.raises(ValueError, match="base_width: 16"):
        VolumeSegmenter.load_from_checkpoint(path, weights_only=True)
    # The same meta at format 2 means what it says: the default width, whose weights do not fit.
    checkpoint["oct3d"]["format_version"] = 2
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError):
        load_segmenter(path, device="cpu")


def test_format_1_check_leaves_module_backbones_alone(tmp_path):
    """A format-1 oct_unet3d checkpoint resumed into a module backbone of the right width loads (no width check)."""
    from oct3d.models import oct_unet3d

    model = VolumeSegmenter(num_classes=3, backbone_kwargs={"alpha": 0.5, "base_width": 16, "depth": 2})
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    checkpoint["oct3d"].update(format_version=1, backbone_kwargs={"alpha": 0.5, "depth": 2})
    module = VolumeSegmenter(backbone=oct_unet3d(1, 3, alpha=0.5, base_width=16, depth=2), num_classes=3)
    module.on_load_checkpoint(checkpoint)  # raised AttributeError before
    module.load_state_dict(checkpoint["state_dict"])


def test_config_without_checkpoint_section_keeps_the_best_dice(tiny_decathlon, tmp_path):
    """The CLI's checkpoint default follows the model: val/dice for the segmenter (val/top1 does not exist here)."""
    from oct3d.lightning.checkpoints import LatestCheckpoint
    from oct3d.lightning.cli import OctCLI

    settings = yaml.safe_load((CONFIGS / "oct_unet3d_demo.yaml").read_text())
    settings.pop("checkpoint")
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(settings))
    run = OctCLI(args=["-c", str(tmp_path / "seg.yaml"), "--data.root", str(tiny_decathlon),
                       "--trainer.logger", "false"], run=False)
    callback = run.trainer.checkpoint_callback
    assert isinstance(callback, LatestCheckpoint) and callback.monitor == "val/dice"
    assert callback.filename == "best-epoch{epoch:03d}-dice={val/dice:.4f}"


def test_an_epoch_without_a_usable_validation_volume_logs_nan_dice_and_goes_on(tmp_path):
    """When every validation volume of an epoch is unreadable, val/dice is NaN (not missing) and the run goes on."""
    import lightning.pytorch as pl

    from oct3d.lightning.checkpoints import LatestCheckpoint

    patch = {"image": torch.randn(1, 1, 8, 8, 8), "label": torch.randint(0, 2, (1, 1, 8, 8, 8)), "failed": [""]}
    unusable = {"image": torch.zeros(1, 0), "label": torch.zeros(1, 0), "valid": torch.tensor([False]),
                "failed": ["case07.nii.gz: unreadable"]}
    model = VolumeSegmenter(backbone_kwargs={"base_width": 4, "depth": 2}, preprocessing={"patch_size": [8, 8, 8]})
    callback = LatestCheckpoint(monitor="val/dice", mode="max", save_last=True, filename="best")
    trainer = pl.Trainer(max_epochs=2, default_root_dir=tmp_path, callbacks=[callback], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader
    trainer.fit(model, train_dataloaders=loader([patch], batch_size=None),
                val_dataloaders=loader([unusable], batch_size=None))
    assert trainer.state.finished and trainer.global_step == 2
    assert torch.isnan(trainer.callback_metrics["val/dice"])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_evaluation_with_a_target_spacing_scores_on_the_files_own_grid(tmp_path):
    """The label stays on its grid; predictions go back there as MONAI's inverse (what `oct3d segment` writes) does."""
    from monai.data import MetaTensor

    from datamodules.volume import preprocess_transform
    from oct3d.lightning.segmentation import resample_to_grid

    root = make_tiny_decathlon(tmp_path / "data", cases=2, broken=False)
    case = read_decathlon(root).training[0]
    prep = {"normalization": "zscore", "nonzero": True, "spacing": [1.0, 1.7, 1.3]}
    item = VolumeDataset([case], "val", 1, 3, prep, cache_rate=0.0)[0]
    original = np.asarray(nib.load(str(case.label)).dataobj)
    assert item["label"].shape == (1, *SHAPE) and np.array_equal(item["label"][0].numpy(), original)
    assert item["image"].shape[1:] != SHAPE and torch.allclose(item["affine_original"], torch.as_tensor(AFFINE))
    transform = preprocess_transform(prep, with_label=False)
    data, affine = load_nifti(case.image, 1)
    image = transform({"image": MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(affine))})["image"]
    assert torch.allclose(item["affine_resampled"], image.affine.double())
    probs = torch.stack([image.as_tensor()[0], -image.as_tensor()[0]]).softmax(0)  # a smooth two-class map
    by_monai = transform.inverse({"image": MetaTensor(probs, affine=image.affine,
                                                      applied_operations=list(image.applied_operations))})["image"]
    ours = resample_to_grid(probs[None], item["affine_resampled"], item["affine_original"], SHAPE)[0]
    assert torch.allclose(ours, by_monai.as_tensor(), atol=1e-5)


def test_orientation_reorients_every_volume_and_scores_on_each_files_grid(tmp_path):
    """A dataset mixing RAS and LAS files: with orientation='RAS' both arrays come out alike, and evaluation
    maps predictions back onto each label's own (flipped) grid."""
    from oct3d.lightning.segmentation import resample_to_grid

    root = make_tiny_decathlon(tmp_path / "data", cases=2, broken=False)
    case = read_decathlon(root).training[0]
    image = np.asarray(nib.load(str(case.image)).dataobj)
    label = np.asarray(nib.load(str(case.label)).dataobj)
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = SHAPE[0] - 1  # voxel x' = (n - 1) - x: the same anatomy stored left-right mirrored
    for name, array in (("las_image.nii.gz", image[::-1]), ("las_label.nii.gz", label[::-1])):
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), AFFINE @ flip), str(root / name))
    mirrored = DecathlonCase(str(root / "las_image.nii.gz"), str(root / "las_label.nii.gz"))
    prep = {"normalization": "zscore", "nonzero": True, "orientation": "RAS"}
    plain, flipped = VolumeDataset([case, mirrored], "val", 1, 3, prep, cache_rate=0.0)
    assert torch.allclose(plain["image"], flipped["image"], atol=1e-5)  # one orientation for both files
    assert np.array_equal(flipped["label"][0].numpy(), label[::-1])  # the label stays as its file stores it
    one_hot = torch.nn.functional.one_hot(plain["label"][0].long(), 3).permute(3, 0, 1, 2)[None].float()
    back = resample_to_grid(one_hot, flipped["affine_resampled"], flipped["affine_original"], SHAPE)
    assert np.array_equal(back.argmax(1)[0].numpy(), label[::-1])
    with pytest.raises(ValueError, match="orientation must be three axis codes"):
        VolumeSegmentationDataModule(str(root), orientation="RAA")


def test_deep_supervision_heads_enter_the_training_loss():
    """MONAI's DynUNet with deep_supervision returns (B, heads, C, X, Y, Z) in training: every head is scored."""
    spec = {"class_path": "monai.networks.nets.DynUNet", "init_args": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "kernel_size": [3, 3, 3], "strides": [1, 2, 2],
        "upsample_kernel_size": [2, 2], "filters": [4, 8, 16], "deep_supervision": True, "deep_supr_num": 1}}
    torch.manual_seed(0)
    model = VolumeSegmenter(backbone=spec, num_classes=3, depth_axis=2, preprocessing={"patch_size": [8, 8, 8]})
    model.log = lambda *args, **kwargs: None
    batch = {"image": torch.randn(2, 1, 8, 8, 8), "label": torch.randint(0, 3, (2, 1, 8, 8, 8)), "failed": ["", ""]}
    assert model(batch["image"]).shape == (2, 2, 3, 8, 8, 8)  # depth_axis permutes around the head axis
    loss = model.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.model.parameters() if p.requires_grad)
    model.eval()
    assert model(batch["image"]).shape == (2, 3, 8, 8, 8)  # evaluation sees the main head only


def test_evaluating_with_other_data_settings_warns_and_records_what_the_data_applies(fitted, tiny_decathlon):
    """The checkpoint says zscore; validating with normalization none warns, naming the setting, and keeps 'none'."""
    from oct3d.lightning.segmentation import VolumeSegmenter

    out, _ = fitted
    best = sorted(out.rglob("best-*.ckpt"))[0]
    args = _fit_args(tiny_decathlon, out)
    del args[args.index("--trainer.max_epochs"):args.index("--trainer.max_epochs") + 2]
    args[0] = "validate"
    args += ["--data.normalization", "none", "--ckpt_path", str(best)]
    seen = {}
    real = VolumeSegmenter.on_load_checkpoint

    def spy(self, checkpoint):
        real(self, checkpoint)
        seen["preprocessing"] = dict(self.preprocessing)

    expected = r"differs from the checkpoint's \(normalization: checkpoint 'zscore', now 'none'\)"
    with pytest.warns(UserWarning, match=expected), pytest.MonkeyPatch.context() as patch:
        patch.setattr(VolumeSegmenter, "on_load_checkpoint", spy)
        cli.main(args)
    assert seen["preprocessing"]["normalization"] == "none"


def test_a_class_count_or_class_list_that_differs_from_the_data_is_refused(tiny_decathlon):
    from oct3d.lightning.modules import check_data_classes
    from oct3d.lightning.segmentation import VolumeSegmenter

    data = VolumeSegmentationDataModule(str(tiny_decathlon), patch_size=(8, 8, 8), num_workers=0)
    model = VolumeSegmenter(num_classes=2, backbone_kwargs={"base_width": 4, "depth": 2})
    with pytest.raises(ValueError, match=r"the data has 3 classes .* num_classes=2; set model.init_args.num_classes"):
        model._take_data_settings(data)
    renamed = VolumeSegmenter(num_classes=3, class_names=["background", "ball", "cube"],
                              backbone_kwargs={"base_width": 4, "depth": 2})
    with pytest.raises(ValueError, match=r"label 2: checkpoint 'box', data 'cube'"):
        check_data_classes(renamed, ["background", "ball", "box"])


def test_a_class_predicted_where_the_ground_truth_has_none_scores_zero_dice():
    """Dice of a class missing from the ground truth: 0 when predicted (false positive), left out when not."""
    from oct3d.lightning.segmentation import VolumeSegmenter

    model = VolumeSegmenter(num_classes=3, backbone_kwargs={"base_width": 4, "depth": 2})
    label = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    label[:, :, :2] = 1  # class 1 in both cases, class 2 in neither
    prediction = label.clone()
    prediction[0, :, 3:] = 2  # case 0 predicts class 2 where there is none
    logits = torch.nn.functional.one_hot(prediction[:, 0], 3).movedim(-1, 1).float()
    model.sliding_window = lambda image: logits
    model._log_failed = lambda batch, stage: None
    model._evaluate({"image": torch.zeros(2, 1, 4, 4, 4), "label": label, "valid": [True, True]}, model.val_dice, "val")
    assert model.val_dice[0].compute().item() == pytest.approx(1.0)
    assert model.val_dice[1].compute().item() == pytest.approx(0.0)  # case 0 only: case 1 rightly predicted none


@pytest.mark.parametrize(("argv", "message"), [
    (["--alphas", "1.5"], "--alphas must each be in [0, 1)"), (["--base-width", "1"], "--base-width must be >= 2"),
    (["--budgets", "-5"], "--budgets must be positive"), (["--output", "/no/such/folder/x.md"], "--output: folder"),
])
def test_segmentation_benchmark_refuses_bad_arguments_before_running(argv, message, capsys):
    from oct3d.segmentation_benchmark import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_foreground_crop_trains_scores_and_segments_on_the_files_own_grid(tmp_path):
    """crop_foreground: volumes cut to their nonzero box (zero air around them); evaluation and `oct3d segment`
    put the result back on the full grid, background outside the box."""
    root = make_tiny_decathlon(tmp_path / "data", cases=4, broken=False)
    for path in [*root.glob("imagesT*/*.nii.gz"), *root.glob("labelsTr/*.nii.gz")]:
        volume = nib.load(str(path))
        _save(np.pad(np.asarray(volume.dataobj), ((3, 2), (0, 4), (1, 1))), path)  # zero air around each
    info = read_decathlon(root)
    prep = {"normalization": "zscore", "nonzero": True, "crop_foreground": True}
    item = VolumeDataset(info.training[:1], "val", 1, 3, prep, cache_rate=0.0)[0]
    padded = (SHAPE[0] + 5, SHAPE[1] + 4, SHAPE[2] + 2)
    assert tuple(item["image"].shape[1:]) == SHAPE and tuple(item["label"].shape[1:]) == padded
    assert item["crop_box"].tolist() == [[3, 0, 1], [3 + SHAPE[0], SHAPE[1], 1 + SHAPE[2]]]
    # An all-zero image keeps its whole grid (no empty volume for the sliding window).
    blank = tmp_path / "blank.nii.gz"
    _save(np.zeros(padded, np.float32), blank)
    case = info.training[0]
    empty = VolumeDataset([type(case)(str(blank), case.label)], "val", 1, 3, prep, cache_rate=0.0)[0]
    assert empty["valid"] and tuple(empty["image"].shape[1:]) == padded
    out = tmp_path / "fit"
    args = _fit_args(root, out)
    args[args.index("--data.val_fraction") + 1] = "0.25"
    args[args.index("--data.spacing"):args.index("--data.spacing") + 2] = ["--data.crop_foreground", "true"]
    cli.main(args)
    checkpoint = sorted(out.rglob("best-*.ckpt"))[0]
    state = torch.load(checkpoint, weights_only=True)
    assert state["oct3d"]["preprocessing"]["crop_foreground"] is True
    assert 0 <= float(state["callbacks"][next(k for k in state["callbacks"] if k.startswith("ModelCheckpoint"))][
        "best_model_score"]) <= 1
    lines = tmp_path / "seg.jsonl"
    assert cli.main(["segment", "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "seg"),
                     "--save-probabilities", "--output", str(lines), str(root / "imagesTs")]) == 0
    for result in map(json.loads, lines.read_text().splitlines()):
        labels = np.asarray(nib.load(result["output"]).dataobj)
        assert labels.shape == padded
        assert not labels[:3].any() and not labels[:, -4:].any()  # outside the box: background
        probs = np.asarray(nib.load(result["probabilities"]).dataobj)
        assert np.allclose(probs.sum(-1), 1.0, atol=1e-4) and np.allclose(probs[:3, ..., 0], 1.0)


def test_probabilities_of_a_cropped_box_go_back_to_their_place_with_background_around():
    from oct3d.lightning.segmentation import to_original_grid

    label = torch.zeros(20, 18, 16, dtype=torch.long)
    label[6:10, 5:9, 4:8] = 1
    box = torch.tensor([[4, 3, 2], [15, 12, 10]])
    inside = label[4:15, 3:12, 2:10]
    probs = torch.stack([(inside == 0).float(), (inside == 1).float()])[None]
    shifted = torch.eye(4, dtype=torch.float64)
    shifted[:3, 3] = torch.tensor([4.0, 3.0, 2.0])  # the cropped grid's affine: the box's corner
    back = to_original_grid(probs, shifted, torch.eye(4, dtype=torch.float64), label.shape, box)
    assert back.shape == (1, 2, 20, 18, 16) and torch.equal(back.argmax(1)[0], label)
    assert torch.allclose(back.sum(1), torch.ones(1, 20, 18, 16))


def test_a_segmenter_fine_tunes_from_a_checkpoint_with_another_class_count(fitted):
    from oct3d.lightning.modules import apply_init_weights
    from oct3d.lightning.segmentation import VolumeSegmenter

    out, _ = fitted
    checkpoint = sorted(out.rglob("best-*.ckpt"))[0]
    source = torch.load(checkpoint, weights_only=True)["state_dict"]
    model = VolumeSegmenter(num_classes=5, backbone_kwargs={"alpha": 0.5, "octave": "spatial", "base_width": 4,
                                                            "depth": 2}, init_weights=str(checkpoint))
    apply_init_weights(model, model.model)
    state = model.model.state_dict()
    torch.testing.assert_close(state["encoder.0.0.0.h2h.weight"], source["model.encoder.0.0.0.h2h.weight"])
    assert state["head.h2h.weight"].shape[0] == 5 and model.hparams["init_weights"] is None
    assert model.init_weights_from == str(checkpoint)
