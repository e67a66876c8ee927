"""KineticsDataModule: layouts, list format, batches, test views, transforms, unreadable videos and their report."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from datamodules import DataErrorReport, KineticsDataModule, format_failures
from datamodules.kinetics import VideoClipDataset, VideoSample, find_annotation_format, read_kinetics_annotations
from datamodules.transforms import VideoEvalTransform, VideoTrainTransform, spatial_crop_boxes

CLASSES = ["moving left", "moving right", "moving up"]  # sorted labels of tiny_kinetics
SMALL = dict(num_frames=4, sampling_rate=2, crop_size=24, min_short_side=28, max_short_side=32, num_workers=0)


def _datamodule(root: Path, **overrides) -> KineticsDataModule:
    settings = {**SMALL, "batch_size": 2, "test_clips": 2, "test_crops": 3, **overrides}
    return KineticsDataModule(str(root), **settings)


def test_num_classes_and_class_names_before_setup(tiny_kinetics):
    datamodule = _datamodule(tiny_kinetics)
    assert datamodule.annotation_format == "kinetics"
    assert datamodule.num_classes == 3
    assert datamodule.class_names == CLASSES
    assert datamodule.datasets == {}  # nothing was set up


def test_train_batch_layout(tiny_kinetics):
    datamodule = _datamodule(tiny_kinetics, batch_size=4)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (4, 3, 4, 24, 24)
    assert batch["video"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and batch["label"].shape == (4,)
    assert batch["video_index"].dtype == torch.long and batch["video_index"].shape == (4,)
    assert batch["failed"] == ["", "", "", ""]
    # Normalized with mean .45 / std .225: values span roughly [-2, 2.45].
    assert batch["video"].min() >= -2.01 and batch["video"].max() <= 2.45


def test_labels_match_label_folders(tiny_kinetics):
    samples = read_kinetics_annotations(tiny_kinetics, "train")
    assert len(samples) == 6
    for sample in samples:
        assert Path(sample.path).is_file()
        assert Path(sample.path).parent.name == CLASSES[sample.label]


def test_val_is_deterministic_center_clip(tiny_kinetics):
    datamodule = _datamodule(tiny_kinetics, batch_size=3)
    first = next(iter(datamodule.val_dataloader()))
    second = next(iter(datamodule.val_dataloader()))
    assert torch.equal(first["video"], second["video"])
    assert first["video_index"].tolist() == [0, 1, 2]


def test_test_views_are_videos_times_clips_times_crops(tiny_kinetics):
    datamodule = _datamodule(tiny_kinetics, batch_size=6)
    datamodule.setup("test")
    dataset = datamodule.datasets["test"]
    assert len(dataset) == 3 * 2 * 3
    batches = list(datamodule.test_dataloader())
    indices = torch.cat([batch["video_index"] for batch in batches])
    assert indices.tolist() == [v for v in range(3) for _ in range(6)]
    views = batches[0]["video"]  # the 6 views of video 0: 2 clips x 3 crops
    assert views.shape == (6, 3, 4, 24, 24)
    # Different clips and crops of the same video differ.
    assert len({tuple(v.flatten()[:64].tolist()) for v in views}) == 6


def test_a_test_batch_decodes_each_video_once_for_all_its_views(tiny_kinetics, monkeypatch):
    import datamodules.kinetics as kinetics

    datamodule = _datamodule(tiny_kinetics, batch_size=8)  # 6 views per video: batches straddle videos
    datamodule.setup("test")
    dataset = datamodule.datasets["test"]
    one_by_one = [dataset[i]["video"] for i in range(len(dataset))]
    opened = []
    real_open = kinetics.open_video
    monkeypatch.setattr(kinetics, "open_video", lambda path, *a: opened.append(path) or real_open(path, *a))
    batches = list(datamodule.test_dataloader())
    assert [b["video"].shape[0] for b in batches] == [8, 8, 2]
    assert len(opened) == 5  # videos 0, 1 | 1, 2 | 2: one open per video per batch, not 18 (one per view)
    torch.testing.assert_close(torch.cat([b["video"] for b in batches]), torch.stack(one_by_one), rtol=0, atol=0)
    assert torch.cat([b["video_index"] for b in batches]).tolist() == [v for v in range(3) for _ in range(6)]
    # The one-resize path of the transform equals one call per crop.
    frames = torch.randint(0, 255, (8, 40, 56, 3), dtype=torch.uint8)
    transform = VideoEvalTransform(4, 24, 28, num_crops=3)
    for got, crop in zip(transform.crops(frames, [2, 0]), (2, 0)):
        assert torch.equal(got, transform(frames, crop))


def test_unreadable_test_videos_are_replaced_per_video_in_a_batch(broken_kinetics):
    samples = read_kinetics_annotations(broken_kinetics, "train")  # the split with unreadable videos
    transform = VideoEvalTransform(4, 24, 28, num_crops=3)
    dataset = VideoClipDataset(samples, "test", transform, 4, 2, num_clips=2, num_crops=3)
    broken = [i for i, s in enumerate(samples) if any(tag in s.path for tag in BROKEN_TRAIN)]
    assert len(broken) == 3
    items = dataset.__getitems__(list(range(len(dataset))))
    assert [item["view_index"] for item in items] == list(range(len(dataset)))  # which view each item is
    assert dataset[7]["view_index"] == 7
    for video_index in broken:
        views = [item for item in items if item["video_index"] == video_index]
        assert len(views) == 6 and all(item["failed"] for item in views)
        assert len({item["label"] for item in views}) == 1  # one stand-in video for all views
        for item, again in zip(views, dataset.__getitems__([video_index * 6 + k for k in range(6)])):
            assert torch.equal(item["video"], again["video"])  # test replacements are fixed


def test_training_replacements_change_between_epochs(broken_kinetics):
    datamodule = _datamodule(broken_kinetics)
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    broken_index = next(i for i, s in enumerate(dataset.samples) if "trunc" in s.path)

    def stand_ins(seed: int) -> list[int]:
        torch.manual_seed(seed)  # Lightning seeds torch per epoch and worker
        return list(dataset._replacements(broken_index))[:3]

    assert stand_ins(0) == stand_ins(0)
    assert len({tuple(stand_ins(seed)) for seed in range(6)}) > 1


def test_short_video_gives_full_clip(tiny_kinetics):
    # 16-frame videos, 8 x 4 = 32-frame clips: frames are spread over the video instead of failing.
    datamodule = _datamodule(tiny_kinetics, num_frames=8, sampling_rate=4, batch_size=6)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (6, 3, 8, 24, 24)
    assert batch["failed"] == [""] * 6


def test_decord_decoder(tiny_kinetics):
    pyav = next(iter(_datamodule(tiny_kinetics, batch_size=3).val_dataloader()))
    decord = next(iter(_datamodule(tiny_kinetics, batch_size=3, decoder="decord").val_dataloader()))
    assert torch.equal(pyav["video"], decord["video"])


def _copy(root: Path, destination: Path) -> Path:
    shutil.copytree(root, destination)
    return destination


def test_label_folders_with_underscores(tiny_kinetics, tmp_path):
    root = _copy(tiny_kinetics, tmp_path / "kinetics")
    for split in ("train", "val", "test"):
        for folder in list((root / split).iterdir()):
            folder.rename(folder.with_name(folder.name.replace(" ", "_")))
    datamodule = _datamodule(root)
    assert datamodule.class_names == CLASSES  # names come from the annotations, with spaces
    samples = datamodule.samples("train")
    assert all(Path(s.path).is_file() and "_" in Path(s.path).parent.name for s in samples)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["failed"] == ["", ""]


def test_flat_layout(tiny_kinetics, tmp_path):
    root = _copy(tiny_kinetics, tmp_path / "kinetics")
    for split in ("train", "val", "test"):
        for video in list((root / split).rglob("*.mp4")):
            video.rename(root / split / video.name)
    samples = _datamodule(root).samples("val")
    assert len(samples) == 3
    assert all(Path(s.path).parent == root / "val" and Path(s.path).is_file() for s in samples)


def test_list_format(tiny_kinetics, tmp_path):
    root = _copy(tiny_kinetics, tmp_path / "lists")
    shutil.rmtree(root / "annotations")
    for split in ("train", "val"):
        lines = []
        for index, video in enumerate(sorted((root / split).rglob("*.mp4"))):
            label = CLASSES.index(video.parent.name)
            # Relative paths (with spaces) and one absolute path.
            path = str(video) if index == 0 else str(video.relative_to(root))
            lines.append(f"{path} {label}")
        (root / f"{split}.{'txt' if split == 'train' else 'csv'}").write_text("\n".join(lines) + "\n")
    datamodule = _datamodule(root, batch_size=3)
    assert datamodule.annotation_format == "list"
    assert datamodule.class_names == ["0", "1", "2"]
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    datamodule = _datamodule(root, batch_size=3)
    assert datamodule.class_names == CLASSES
    samples = datamodule.samples("train")
    assert [Path(s.path).parent.name for s in samples] == [CLASSES[s.label] for s in samples]
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["video"].shape == (3, 3, 4, 24, 24) and batch["failed"] == ["", "", ""]


def test_list_format_bad_label(tmp_path):
    (tmp_path / "train.txt").write_text("a.mp4 cat\n")
    with pytest.raises(ValueError, match="label must be an integer"):
        _ = _datamodule(tmp_path).num_classes


def test_missing_column_is_a_clear_error(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.csv").write_text("label,youtube_id,time_start\nx,abc,0\n")
    with pytest.raises(ValueError, match=r"missing column.*time_end"):
        _ = _datamodule(tmp_path).num_classes


def test_no_annotations_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no annotations"):
        find_annotation_format(tmp_path)


def test_extra_columns_ignored_and_unlabelled_test_split(tiny_kinetics, tmp_path):
    root = _copy(tiny_kinetics, tmp_path / "kinetics")
    with open(root / "annotations" / "test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(root / "annotations" / "test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["youtube_id", "time_start", "time_end", "split", "is_cc"])
        writer.writerows([(r["youtube_id"], r["time_start"], r["time_end"], "test", 0) for r in rows])
    samples = _datamodule(root).samples("test")
    assert [s.label for s in samples] == [-1, -1, -1]
    assert all(Path(s.path).is_file() for s in samples)
    # lightning test refuses it before any step (on every rank alike), instead of reporting accuracy 0.
    import lightning.pytorch as pl

    from oct3d.lightning import VideoClassifier

    model = VideoClassifier(backbone="oct_i3d_r50", num_classes=3,
                            backbone_kwargs={"alpha": 0.5, "base_width": 8, "depths": [1, 1, 1, 1]})
    steps = []
    model.model.register_forward_hook(lambda *args: steps.append(1))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="the test split has videos without labels"):
        trainer.test(model, datamodule=_datamodule(root, num_workers=0), verbose=False)
    assert not steps


def test_bad_arguments(tiny_kinetics):
    with pytest.raises(ValueError, match="decoder"):
        _datamodule(tiny_kinetics, decoder="opencv")
    with pytest.raises(ValueError, match="min_short_side"):
        _datamodule(tiny_kinetics, crop_size=64)
    with pytest.raises(ValueError, match="num_frames"):
        _datamodule(tiny_kinetics, num_frames=0)
    with pytest.raises(ValueError, match="flip_prob"):
        _datamodule(tiny_kinetics, flip_prob=1.5)


def test_transforms():
    frames = torch.randint(0, 256, (8, 30, 40, 3), dtype=torch.uint8)
    clip = VideoTrainTransform(4, 24, 26, 30)(frames)
    assert clip.shape == (3, 4, 24, 24) and clip.dtype == torch.float32
    evaluate = VideoEvalTransform(4, 24, 30, num_crops=3)
    crops = [evaluate(frames, i) for i in range(3)]
    assert all(c.shape == (3, 4, 24, 24) for c in crops)
    assert torch.equal(evaluate(frames), crops[1])
    assert spatial_crop_boxes(30, 40, 24, 3) == [(3, 0), (3, 8), (3, 16)]  # left, center, right
    assert spatial_crop_boxes(40, 30, 24, 3) == [(0, 3), (8, 3), (16, 3)]  # top, center, bottom
    # Same size, no resize: the eval transform is exactly crop + scale + normalize.
    still = torch.full((4, 24, 24, 3), 255, dtype=torch.uint8)
    assert torch.allclose(VideoEvalTransform(4, 24, 24)(still), torch.full((3, 4, 24, 24), (1 - 0.45) / 0.225))
    with pytest.raises(ValueError, match="crop_index"):
        evaluate(frames, 3)
    with pytest.raises(ValueError, match=r"shape \(T, H, W, 3\)"):
        evaluate(frames.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="max_short_side"):
        VideoTrainTransform(4, 24, 30, 26)


# Unreadable videos ---------------------------------------------------------------------------------

BROKEN_TRAIN = {"trunc000001", "missng00002", "notvideo003"}


def _failed_ids(entries) -> set[str]:
    return {Path(entry.split(": ")[0]).name.split("_")[0] for entry in entries if entry}


def test_broken_videos_are_replaced_and_reported(broken_kinetics):
    datamodule = _datamodule(broken_kinetics, batch_size=3)
    batches = list(datamodule.train_dataloader())
    assert [b["video"].shape[0] for b in batches] == [3, 3, 3]  # 6 good + 3 broken videos, all batches full
    failed = [entry for batch in batches for entry in batch["failed"] if entry]
    assert len(failed) == 3
    assert _failed_ids(failed) == BROKEN_TRAIN
    reasons = {Path(e.split(": ")[0]).name.split("_")[0]: e.split(": ", 1)[1] for e in failed}
    assert reasons["missng00002"] == "file not found"
    assert reasons["notvideo003"].startswith("not a video file (cannot open: ")
    assert reasons["trunc000001"].startswith("corrupt or truncated video (cannot open: ")
    # The dataset (main process here) remembers its failures too.
    assert _failed_ids(f"{p}: {r}" for p, r in datamodule.datasets["train"].failures.items()) == BROKEN_TRAIN


def test_broken_videos_with_worker_processes(broken_kinetics):
    datamodule = _datamodule(broken_kinetics, batch_size=3, num_workers=2)
    failed = [entry for batch in datamodule.train_dataloader() for entry in batch["failed"] if entry]
    assert _failed_ids(failed) == BROKEN_TRAIN


def test_replacement_is_deterministic(broken_kinetics):
    datamodule = _datamodule(broken_kinetics)
    datamodule.setup("validate")
    dataset = datamodule.datasets["val"]
    broken_index = next(i for i, s in enumerate(dataset.samples) if "truncval004" in s.path)
    first, second = dataset[broken_index], dataset[broken_index]
    assert torch.equal(first["video"], second["video"]) and first["label"] == second["label"]
    assert first["video_index"] == broken_index and "truncval004" in first["failed"]


def test_no_readable_video_is_a_clear_error(tmp_path):
    (tmp_path / "bad.mp4").write_text("nope")
    samples = [VideoSample(str(tmp_path / "bad.mp4"), 0), VideoSample(str(tmp_path / "gone.mp4"), 1)]
    dataset = VideoClipDataset(samples, "val", VideoEvalTransform(4, 24, 28), 4, 2)
    with pytest.raises(RuntimeError, match="no readable video in this split"):
        dataset[0]


def test_format_failures():
    line = format_failures(["b.mp4: file not found", "a.mp4: truncated: x", "a.mp4: truncated: x"])
    assert line == "2 unreadable videos this epoch: a.mp4 (truncated: x), b.mp4 (file not found)"
    assert format_failures([f"{i}.mp4: bad" for i in range(4)], limit=2).endswith("1.mp4 (bad), and 2 more")


class _TinyVideoModel(pl.LightningModule):
    """Mean-pooled linear classifier: just enough to run fit on video batches."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, num_classes)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.linear(video.mean(dim=(2, 3, 4)))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch["video"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self(batch["video"]), batch["label"])
        self.log("val_loss", loss, batch_size=len(batch["label"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_error_report_in_trainer_fit(broken_kinetics, caplog):
    datamodule = _datamodule(broken_kinetics, batch_size=3, num_workers=1)
    report = DataErrorReport()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        callbacks=[report],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.datamodules"):
        trainer.fit(_TinyVideoModel(datamodule.num_classes), datamodule=datamodule)
    assert trainer.current_epoch == 2
    by_stage = [(r.stage, r.epoch, _failed_ids(r.failures)) for r in report.history]
    assert by_stage == [
        ("validation", 0, {"truncval004"}),
        ("train", 0, BROKEN_TRAIN),
        ("validation", 1, {"truncval004"}),
        ("train", 1, BROKEN_TRAIN),
    ]
    lines = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(lines) == 4
    assert lines[1].startswith("3 unreadable videos this epoch (train, epoch 0): ")
    assert "missng00002_000000_000002.mp4 (file not found)" in lines[1]


# Several clips per decode -----------------------------------------------------------------------------


def test_multi_clip_batch_layout(tiny_kinetics):
    datamodule = _datamodule(tiny_kinetics, batch_size=2, clips_per_video=3)
    assert datamodule.clips_per_batch == 6
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (6, 3, 4, 24, 24)
    assert batch["label"].shape == batch["video_index"].shape == (6,)
    assert batch["failed"] == [""] * 6
    # The clips of one video are consecutive and carry its label and index.
    for group in range(2):
        labels = batch["label"][group * 3 : group * 3 + 3]
        indices = batch["video_index"][group * 3 : group * 3 + 3]
        assert len(set(labels.tolist())) == 1 and len(set(indices.tolist())) == 1
    # Evaluation is unchanged: one clip per video.
    assert next(iter(datamodule.val_dataloader()))["video"].shape == (2, 3, 4, 24, 24)


def test_multi_clip_each_clip_has_its_own_start_and_augmentation(tiny_kinetics):
    from datamodules.video import clip_indices, open_video

    clips = 4
    datamodule = _datamodule(tiny_kinetics, clips_per_video=clips, sampling_rate=1)
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    transform = dataset.transform
    torch.manual_seed(3)
    item = dataset[0]
    assert item["video"].shape == (clips, 3, 4, 24, 24)
    # Replay the random draws: per clip a start frame, then its own scale, crop and flip.
    torch.manual_seed(3)
    expected, draws = [], []
    with open_video(dataset.samples[0].path) as reader:
        info = reader.info
        slack = info.num_frames - 4
        for _ in range(clips):
            start = int(torch.randint(0, slack + 1, ()).item())
            choice = transform.sample(info.height, info.width)
            draws.append((start, choice))
            frames = reader.get_frames(clip_indices(info.num_frames, start, 4, 1))
            expected.append(transform.apply(frames, choice))
    assert torch.equal(item["video"], torch.stack(expected))
    assert len(set(draws)) == clips  # independent draws: no two clips share start and augmentation
    assert len({tuple(clip.flatten()[:256].tolist()) for clip in item["video"]}) == clips


def test_single_clip_draws_match_the_transform_called_on_decoded_frames(tiny_kinetics):
    # clips_per_video=1 keeps the augmentation distribution: same draws, in the same order, as calling
    # the transform on the decoded clip (the pre-multi-clip code path).
    from datamodules.video import clip_indices, open_video

    datamodule = _datamodule(tiny_kinetics)
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    torch.manual_seed(5)
    item = dataset[1]
    torch.manual_seed(5)
    with open_video(dataset.samples[1].path) as reader:
        start = int(torch.randint(0, reader.info.num_frames - 7 + 1, ()).item())
        frames = reader.get_frames(clip_indices(reader.info.num_frames, start, 4, 2))
    assert torch.equal(item["video"], dataset.transform(frames))


def test_multi_clip_with_broken_videos(broken_kinetics):
    datamodule = _datamodule(broken_kinetics, batch_size=3, clips_per_video=2, num_workers=1)
    batches = list(datamodule.train_dataloader())
    assert [b["video"].shape[0] for b in batches] == [6, 6, 6]
    failed = [entry for batch in batches for entry in batch["failed"] if entry]
    assert _failed_ids(failed) == BROKEN_TRAIN and len(failed) == 2 * len(BROKEN_TRAIN)


def test_decode_time_resize_matches_torch_resize(tiny_kinetics):
    torch.manual_seed(0)
    plain = _datamodule(tiny_kinetics, clips_per_video=2)
    plain.setup("fit")
    torch.manual_seed(0)
    first = plain.datasets["train"][2]["video"]
    scaled = _datamodule(tiny_kinetics, clips_per_video=2, decode_time_resize=True)
    scaled.setup("fit")
    torch.manual_seed(0)
    second = scaled.datasets["train"][2]["video"]
    assert first.shape == second.shape
    # libswscale and torchvision interpolate slightly differently; same crops, flips and scales.
    assert (first - second).abs().mean() < 0.1
    val = next(iter(_datamodule(tiny_kinetics, batch_size=3, decode_time_resize=True).val_dataloader()))["video"]
    reference = next(iter(_datamodule(tiny_kinetics, batch_size=3).val_dataloader()))["video"]
    assert val.shape == reference.shape and (val - reference).abs().mean() < 0.1


def test_decoder_threads_and_clip_arguments(tiny_kinetics):
    assert _datamodule(tiny_kinetics, decoder_threads=3).reader_threads() == 3
    assert _datamodule(tiny_kinetics, decoder_threads=0, num_workers=64).reader_threads() == 1
    with pytest.raises(ValueError, match="clips_per_video"):
        _datamodule(tiny_kinetics, clips_per_video=0)
    with pytest.raises(ValueError, match="decoder_threads"):
        _datamodule(tiny_kinetics, decoder_threads=-1)
    datamodule = _datamodule(tiny_kinetics, decoder="auto", batch_size=3)
    assert next(iter(datamodule.val_dataloader()))["video"].shape == (3, 3, 4, 24, 24)
    assert datamodule.datasets["val"].decoder in ("pyav", "decord", "torchcodec")


@pytest.mark.parametrize("suffix", [".mpg", ".MTS", ".webm", ".3gp"])
def test_other_containers_in_label_folders(tiny_kinetics, tmp_path, suffix):
    from datamodules.synthetic import DEFAULT_CODECS, write_video
    from datamodules.video import read_video

    root = _copy(tiny_kinetics, tmp_path / "kinetics")
    for video in list((root / "train").rglob("*.mp4")):
        frames = read_video(video).frames.numpy()
        write_video(video.with_suffix(suffix), frames, 24, DEFAULT_CODECS[suffix.lower()])
        video.unlink()
    samples = _datamodule(root).samples("train")
    assert all(Path(s.path).suffix == suffix and Path(s.path).is_file() for s in samples)
    batch = next(iter(_datamodule(root, batch_size=6).train_dataloader()))
    assert batch["failed"] == [""] * 6


def test_annotations_with_a_byte_order_mark_are_read(tmp_path):
    """Spreadsheet exports start CSVs with a UTF-8 byte-order mark; the first column must still be 'label'."""
    (tmp_path / "annotations").mkdir()
    rows = "label,youtube_id,time_start,time_end,split\nwaving,abc,0,10,train\nclapping,def,5,15,train\n"
    (tmp_path / "annotations" / "train.csv").write_text("\ufeff" + rows, encoding="utf-8")
    samples = read_kinetics_annotations(tmp_path, "train")
    assert sorted(s.label for s in samples) == [0, 1]


def test_target_fps_samples_the_same_time_span_at_every_frame_rate(tmp_path):
    import numpy as np

    from datamodules.synthetic import render_motion_video, write_mp4
    from datamodules.video import read_video
    from oct3d.inference import ModelMetadata, _load_video_views
    from oct3d.lightning import VideoClassifier

    frames = render_motion_video("moving up", np.random.default_rng(3), frames=24, size=32)
    slow, fast = tmp_path / "slow.mp4", tmp_path / "fast.mp4"
    write_mp4(slow, frames[::2], fps=6)  # the same two seconds at 6 and at 12 fps
    write_mp4(fast, frames, fps=12)
    samples = [VideoSample(str(slow), 0), VideoSample(str(fast), 1)]
    source = {0: read_video(slow).frames, 1: read_video(fast).frames}

    def decoded(dataset: VideoClipDataset, index: int) -> torch.Tensor:
        return dataset[index]["video"]

    # Validation: the centre clip of 3 frames every 2 frames at 6 fps, i.e. every 4 frames of the 12 fps video.
    val = VideoClipDataset(samples, "val", lambda clip: clip, 3, 2, target_fps=6)
    assert torch.equal(decoded(val, 0), source[0][[3, 5, 7]])
    assert torch.equal(decoded(val, 1), source[1][[7, 11, 15]])
    frame_based = VideoClipDataset(samples, "val", lambda clip: clip, 3, 2)  # the default: source frames
    assert torch.equal(decoded(frame_based, 1), source[1][[9, 11, 13]])
    # Training: random starts, and the fast video's frames are still 4 apart.
    train = VideoClipDataset(samples, "train", lambda clip: clip, 3, 2, target_fps=6.0)
    torch.manual_seed(0)
    for _ in range(3):
        clip = decoded(train, 1)
        start = next(i for i in range(len(source[1])) if torch.equal(source[1][i], clip[0]))
        assert torch.equal(clip, source[1][[start, start + 4, start + 8]])
    # Test views: the clips spread over the video as in validation, in 12 fps frames.
    test = VideoClipDataset(samples, "test", lambda clip, crop: clip, 3, 2, num_clips=2, target_fps=6)
    assert torch.equal(test[2]["video"], source[1][[0, 4, 8]])
    assert torch.equal(test[3]["video"], source[1][[15, 19, 23]])
    with pytest.raises(ValueError, match="target_fps must be a positive number"):
        VideoClipDataset(samples, "val", lambda clip: clip, 3, 2, target_fps=0)

    # The data module passes it on, checkpoints keep it, and inference samples clips the same way.
    datamodule = KineticsDataModule(str(tmp_path), num_frames=3, sampling_rate=2, crop_size=16, min_short_side=16,
                                    max_short_side=16, target_fps=6)
    assert datamodule.target_fps == 6.0
    with pytest.raises(ValueError, match="target_fps"):
        KineticsDataModule(str(tmp_path), target_fps=-1)
    preprocessing = VideoClassifier(backbone="oct_i3d_r50")._preprocessing_from(datamodule)
    assert preprocessing["target_fps"] == 6.0 and preprocessing["sampling_rate"] == 2
    assert VideoClassifier()._preprocessing_from(_datamodule(tmp_path))["target_fps"] is None
    meta = ModelMetadata("video", "oct_i3d_r50", {}, 2, None, {**preprocessing, "short_side": 16})
    views, (segment,), _ = _load_video_views(fast, meta, 1, None, None, "pyav")
    assert segment.clip_starts == (7,) and views.shape == (1, 3, 3, 16, 16)


def test_val_rows_of_a_class_missing_from_train_are_skipped_and_counted(tmp_path):
    """A val label the model never trained on cannot be scored: its rows are skipped with one warning."""
    (tmp_path / "annotations").mkdir()
    header = "label,youtube_id,time_start,time_end,split\n"
    (tmp_path / "annotations" / "train.csv").write_text(header + "waving,a,0,10,train\nclapping,b,0,10,train\n")
    (tmp_path / "annotations" / "val.csv").write_text(
        header + "waving,c,0,10,val\njuggling,d,0,10,val\njuggling,e,0,10,val\nskating,f,0,10,val\n"
    )
    with pytest.warns(UserWarning, match=r"val\.csv: skipped 3 row\(s\).*'juggling' \(2\), 'skating' \(1\)"):
        samples = read_kinetics_annotations(tmp_path, "val")
    assert [s.label for s in samples] == [1]  # waving, among the sorted train classes clapping, waving


def test_list_format_label_past_the_classes(tmp_path):
    (tmp_path / "train.txt").write_text("a.mp4 0\nb.mp4 1\n")
    (tmp_path / "val.txt").write_text("c.mp4 1\nd.mp4 5\n")
    datamodule = _datamodule(tmp_path)
    assert datamodule.num_classes == 2
    with pytest.warns(UserWarning, match=r"val\.txt: skipped 1 row\(s\) whose label is not in \[0, 2\): 5 \(1\)"):
        assert [s.label for s in datamodule.samples("val")] == [1]
    (tmp_path / "classes.txt").write_text("only\n")  # the train split defines the classes: fewer is an error
    with pytest.raises(ValueError, match="label 1 out of range for 1 classes"):
        _datamodule(tmp_path).samples("train")
