"""VideoClassifier / ImageClassifier: schedule, argument checks, multi-view aggregation, checkpoint metadata."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from oct3d.lightning import CHECKPOINT_KEY, ImageClassifier, VideoClassifier, WarmupCosine
from oct3d.models import register_model
from oct3d.models.registry import list_models


class _MeanLogits(nn.Module):
    """Logits = per-channel mean of the input: a test can choose every view's logits exactly."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(()))  # something for the optimizer to hold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.dim())))[:, : self.num_classes] * self.scale


if "_test_mean_logits" not in list_models():

    @register_model(task="video")
    def _test_mean_logits(num_classes: int = 3) -> nn.Module:
        """Test-only backbone (see ``_MeanLogits``)."""
        return _MeanLogits(num_classes)


def test_warmup_cosine_values():
    schedule = WarmupCosine(warmup_steps=2, total_steps=10, start_factor=0.0, min_factor=0.1)
    assert schedule(0) == 0.0
    assert schedule(1) == 0.5
    assert schedule(2) == 1.0
    assert schedule(6) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule(10) == pytest.approx(0.1)
    assert schedule(50) == pytest.approx(0.1)
    no_warmup = WarmupCosine(0, 4)
    assert [no_warmup(s) for s in range(5)] == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5,
                                                              0.5 - 0.5 * math.cos(math.pi / 4), 0.0])
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(11, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"lr": 0.0}, "lr"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"class_names": ["a", "b"]}, "class_names"),
        ({"backbone_kwargs": {"num_classes": 3}}, "num_classes"),
        ({"backbone": "no_such_model"}, "unknown model"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    args = {"backbone": "_test_mean_logits", "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        VideoClassifier(**args)


def _views(logits_per_view: list[list[float]], labels: list[int], video_index: list[int]) -> list[dict]:
    # One sample per view: a (3, 1, 2, 2) clip whose channel means are the wanted logits.
    return [
        {"video": torch.tensor(v).view(3, 1, 1, 1).expand(3, 1, 2, 2).clone(), "label": y, "video_index": i}
        for v, y, i in zip(logits_per_view, labels, video_index)
    ]


def test_multi_view_test_aggregates_softmax_per_video():
    # Video 0 (label 0): views predict 0 and 1, but the averaged softmax picks 0.
    # Video 1 (label 2): both views predict 1 -> wrong at video level.
    samples = _views(
        [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.5]],
        labels=[0, 0, 2, 2],
        video_index=[0, 0, 1, 1],
    )
    model = VideoClassifier(backbone="_test_mean_logits", num_classes=3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.test(model, DataLoader(samples, batch_size=3), verbose=False)
    assert metrics["test/view_top1"] == pytest.approx(0.25)
    assert metrics["test/top1"] == pytest.approx(0.5)
    assert metrics["test/top5"] == pytest.approx(1.0)  # top-5 clipped to the 3 classes
    assert metrics["test/num_videos"] == 2


def test_a_repeated_view_counts_once_in_the_view_metrics():
    """DDP's sampler pads the test set with repeats of its first items; a view named twice counts once."""
    samples = _views([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0]], labels=[0, 0, 2], video_index=[0, 0, 1])
    for view, sample in enumerate(samples):
        sample["view_index"] = view
    padded = [*samples, samples[0]]  # the first view again, as the padding of a 2-rank sampler would
    model = VideoClassifier(backbone="_test_mean_logits", num_classes=3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.test(model, DataLoader(padded, batch_size=2), verbose=False)
    assert metrics["test/view_top1"] == pytest.approx(1 / 3)  # not 2 / 4


def test_optimizer_and_schedule_follow_hyperparameters():
    model = VideoClassifier(backbone="_test_mean_logits", num_classes=3, optimizer="sgd", lr=0.4, momentum=0.8,
                            weight_decay=1e-3, warmup_epochs=1, lr_reference_batch_size=8)
    samples = _views([[1.0, 0.0, 0.0]] * 8, [0] * 8, list(range(8)))

    class Data(pl.LightningDataModule):
        batch_size = 2

        def train_dataloader(self):
            return DataLoader(samples, batch_size=self.batch_size)

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, max_epochs=2)
    trainer.fit(model, datamodule=Data())
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    # lr scaled by total batch 2 / reference 8; after 8 of 8 steps the cosine reached 0.
    assert group["initial_lr"] == pytest.approx(0.1)
    assert group["momentum"] == 0.8 and group["weight_decay"] == 1e-3
    assert group["foreach"] is True  # CPU parameters: the multi-tensor implementation (foreach_kwargs)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    from oct3d.lightning.modules import planned_schedule

    plan = planned_schedule(*scheduler.lr_lambdas[0].args)
    assert plan.warmup_steps == 4 and plan.total_steps == 8
    assert group["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_checkpoint_whose_classes_differ_from_the_data_is_refused():
    from types import SimpleNamespace

    model = ImageClassifier(backbone="_test_mean_logits", num_classes=3)
    checkpoint = {CHECKPOINT_KEY: {"class_names": ["a moving up", "b", "c"]}}
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(class_names=["b", "c", "a moving up"]))
    with pytest.raises(ValueError, match=r"classes differ .*label 0: checkpoint 'a moving up', data 'b'"):
        model.on_load_checkpoint(checkpoint)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(class_names=["a moving up", "b", "c"]))
    model.on_load_checkpoint(checkpoint)
    assert model.class_names == ["a moving up", "b", "c"]
    model._trainer = None  # load_from_checkpoint: no data to compare with
    model.on_load_checkpoint(checkpoint)
    # Names given in the config are what the run labels with (and what it saved): resuming it is fine.
    named = ImageClassifier(backbone="_test_mean_logits", num_classes=3, class_names=["a moving up", "b", "c"])
    named._trainer = SimpleNamespace(datamodule=SimpleNamespace(class_names=["n01", "n02", "n03"]))
    named.on_load_checkpoint(checkpoint)


def test_a_checkpoint_of_another_network_names_the_settings_that_differ():
    from types import SimpleNamespace

    model = VideoClassifier(backbone="oct_r3d_18", num_classes=3, backbone_kwargs={"alpha": 0.5, "base_width": 8})
    checkpoint = {"state_dict": model.state_dict(), CHECKPOINT_KEY: {
        "backbone": "oct_r3d_18", "backbone_kwargs": dict(model.hparams.backbone_kwargs), "num_classes": 3}}
    other = VideoClassifier(backbone="oct_r3d_18", num_classes=3, backbone_kwargs={"alpha": 0.5, "base_width": 16})
    other.on_load_checkpoint(checkpoint)  # no Trainer: load_from_checkpoint decides strictness itself
    other._trainer = SimpleNamespace(datamodule=None)  # a Trainer's restore (resume, test --ckpt_path)
    with pytest.raises(ValueError, match=r"another network .*base_width: checkpoint 8, config 16"):
        other.on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"another network .*\(\d+ parameter\(s\) differ"):
        other.on_load_checkpoint({"state_dict": checkpoint["state_dict"]})  # no metadata: nothing to name
    again = VideoClassifier(backbone="oct_r3d_18", num_classes=3, backbone_kwargs={"alpha": 0.5, "base_width": 8,
                                                                                    "dropout": 0.3})
    again._trainer = SimpleNamespace(datamodule=None)
    again.on_load_checkpoint(checkpoint)  # a setting without parameters (dropout) may change on resume


def test_checkpoint_holds_plain_metadata(tmp_path):
    model = ImageClassifier(backbone="_test_mean_logits", num_classes=3, class_names=["a", "b", "c"],
                            preprocessing={"crop_size": 32, "resize_size": 36, "mean": [0.5] * 3, "std": [0.2] * 3})
    model.input_key = "video"  # the test backbone reads any tensor
    samples = _views([[1.0, 0.0, 0.0]] * 2, [0] * 2, [0, 1])
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, max_steps=1)
    trainer.fit(model, DataLoader(samples, batch_size=2))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # plain types only
    meta = checkpoint[CHECKPOINT_KEY]
    assert meta["task"] == "image"
    assert meta["backbone"] == "_test_mean_logits"
    assert meta["class_names"] == ["a", "b", "c"]
    assert meta["preprocessing"]["crop_size"] == 32
    assert checkpoint["hyper_parameters"]["num_classes"] == 3


@pytest.mark.parametrize(
    ("attributes", "expected"), [({"batch_size": 2}, 0.1), ({"batch_size": 2, "clips_per_batch": 4}, 0.2)]
)
def test_linear_lr_rule_counts_clips_per_batch(attributes, expected):
    """With several clips per video the step holds clips_per_batch samples, and the LR scales with that."""
    from types import SimpleNamespace

    model = VideoClassifier(backbone="_test_mean_logits", num_classes=3, lr=0.4, lr_reference_batch_size=8)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(**attributes), world_size=1, accumulate_grad_batches=1)
    assert model.effective_lr() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "adam"}, "optimizer must be"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"warmup_epochs": -1}, "warmup_epochs must be >= 0"),
    ],
)
def test_optimisation_arguments_are_checked_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VideoClassifier(backbone="_test_mean_logits", num_classes=3, **kwargs)


def test_foreach_only_where_every_parameter_is_on_the_cpu():
    from oct3d.lightning.modules import foreach_kwargs

    assert foreach_kwargs([torch.zeros(2), torch.zeros(3)]) == {"foreach": True}
    assert foreach_kwargs([]) == {}
    assert foreach_kwargs([torch.zeros(2, device="meta")]) == {}


def test_backbone_kwargs_are_recorded_complete():
    """Every builder argument lands in the hyperparameters, so a checkpoint survives a changed default."""
    model = VideoClassifier(backbone="oct_c2d_r50", num_classes=3,
                            backbone_kwargs={"base_width": 4, "depths": (1, 1, 1, 1)})
    recorded = model.hparams["backbone_kwargs"]
    assert recorded["base_width"] == 4 and recorded["depths"] == [1, 1, 1, 1]
    assert recorded["alpha"] == 0.5 and recorded["octave"] == "spatial" and "num_classes" not in recorded
    assert model.hparams_initial["backbone_kwargs"] == recorded  # what loggers write to hparams.yaml
    with pytest.raises(ValueError, match="takes no argument"):
        VideoClassifier(backbone="oct_c2d_r50", num_classes=3, backbone_kwargs={"widht": 4})


def test_evaluation_leaves_out_the_substitutes_of_unreadable_videos():
    """A replaced (unreadable) video is not scored in validation or test, and test counts it as failed."""
    import lightning.pytorch as pl

    from oct3d.lightning import VideoClassifier

    torch.manual_seed(0)
    model = VideoClassifier(backbone="oct_i3d_r50", num_classes=3,
                            backbone_kwargs={"alpha": 0.5, "base_width": 8, "depths": [1, 1, 1, 1]})
    clips = torch.randn(4, 3, 4, 32, 32)
    # Videos 0 and 1, two views each; video 1's views are substitutes of an unreadable file.
    batch = {"video": clips, "label": torch.tensor([0, 0, 2, 2]), "video_index": torch.tensor([0, 0, 1, 1]),
             "failed": ["", "", "v1.mp4: unreadable", "v1.mp4: unreadable"]}
    everything_failed = {**batch, "failed": ["v: unreadable"] * 4}
    seen = []
    model.model.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader
    (tested,) = trainer.test(model, loader([batch], batch_size=None), verbose=False)
    assert tested["test/num_videos"] == 1 and tested["test/failed_videos"] == 1
    assert seen == [2]  # only the two readable views were scored
    # A video with one readable view and one stand-in counts as failed for the view metrics too.
    partly = {**batch, "failed": ["", "", "", "v1.mp4: truncated"]}
    (alone,) = trainer.test(model, loader([{**batch, "video": clips[:2], "label": batch["label"][:2],
                                              "video_index": batch["video_index"][:2], "failed": ["", ""]}],
                                            batch_size=None), verbose=False)
    (mixed,) = trainer.test(model, loader([partly], batch_size=None), verbose=False)
    assert mixed["test/num_videos"] == 1 and mixed["test/failed_videos"] == 1
    assert mixed["test/view_top1"] == alone["test/view_top1"] and mixed["test/top1"] == alone["test/top1"]
    seen.clear()
    (validated,) = trainer.validate(model, loader([batch, everything_failed], batch_size=None), verbose=False)
    # Videos, not views: video 1 in the first batch, videos 0 and 1 in the second.
    assert validated["val/failed_videos"] == 3 and "val/top1" in validated
    assert seen == [2]  # the batch of stand-ins only was not scored
    # Prediction returns every row, but a stand-in's scores are NaN and marked, never another video's.
    from datamodules import DataErrorReport

    report = DataErrorReport()
    predictor = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                           callbacks=[report])
    (predicted,) = predictor.predict(model, loader([batch], batch_size=None))
    assert predicted["failed"].tolist() == [False, False, True, True]
    assert predicted["probs"][:2].isfinite().all() and predicted["probs"][2:].isnan().all()
    assert predicted["label"].tolist() == [0, 0, -1, -1] and predicted["video_index"].tolist() == [0, 0, 1, 1]
    assert [(r.stage, r.failures) for r in report.history] == [("predict", ["v1.mp4: unreadable"])]


def test_a_resumed_schedule_is_planned_over_the_new_run_length():
    """Raising max_epochs on resume stretches the cosine instead of keeping the old run's final rate."""
    from types import SimpleNamespace

    from oct3d.lightning.modules import apply_scheduled_lr, warmup_cosine_schedule

    def run(total: int, state: dict | None = None):
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = SimpleNamespace(num_training_batches=3, accumulate_grad_batches=1, max_steps=-1,
                                  max_epochs=total // 3)
        config = warmup_cosine_schedule(opt, trainer, warmup_epochs=0.0, start_factor=0.01, min_factor=0.0)
        scheduler = config["scheduler"]
        if state is not None:
            opt.param_groups[0]["lr"] = 0.0  # what the optimizer state restores at the end of the old curve
            scheduler.load_state_dict(state)
            trainer.lr_scheduler_configs = [SimpleNamespace(scheduler=scheduler)]
            apply_scheduled_lr(trainer)
        return opt, scheduler

    opt, scheduler = run(3)
    for _ in range(3):
        opt.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == 0.0
    opt, resumed = run(6, scheduler.state_dict())
    expected = 0.1 * WarmupCosine(0, 6, 0.01, 0.0)(3)
    assert resumed.last_epoch == 3 and opt.param_groups[0]["lr"] == pytest.approx(expected) and expected > 0.04
    opt.step()
    resumed.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * WarmupCosine(0, 6, 0.01, 0.0)(4))


def test_a_resumed_run_follows_its_own_peak_learning_rate():
    """--model.lr (or the linear scaling rule on another device count) on resume replaces the checkpoint's peak."""
    from types import SimpleNamespace

    from oct3d.lightning.modules import apply_scheduled_lr, warmup_cosine_schedule

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleNamespace(num_training_batches=3, accumulate_grad_batches=1, max_steps=-1,
                              max_epochs=2)
    scheduler = warmup_cosine_schedule(opt, trainer, warmup_epochs=0.0, start_factor=0.01, min_factor=0.0)["scheduler"]
    for _ in range(3):
        opt.step()
        scheduler.step()
    trainer.lr_scheduler_configs = [SimpleNamespace(scheduler=scheduler)]
    apply_scheduled_lr(trainer, peak_lr=0.4)  # the resumed run asks for four times the old peak
    assert scheduler.base_lrs == [0.4] and opt.param_groups[0]["initial_lr"] == 0.4
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * WarmupCosine(0, 6, 0.01, 0.0)(3))
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * WarmupCosine(0, 6, 0.01, 0.0)(4))


def test_testing_an_unlabelled_split_is_refused_not_scored_zero():
    import lightning.pytorch as pl

    from oct3d.lightning import VideoClassifier

    model = VideoClassifier(backbone="oct_i3d_r50", num_classes=3,
                            backbone_kwargs={"alpha": 0.5, "base_width": 8, "depths": [1, 1, 1, 1]})
    batch = {"video": torch.randn(2, 3, 4, 32, 32), "label": torch.tensor([-1, -1]),
             "video_index": torch.tensor([0, 1])}
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="the test split has videos without labels"):
        trainer.test(model, torch.utils.data.DataLoader([batch], batch_size=None), verbose=False)


def test_restored_preprocessing_is_what_the_data_module_applies_and_never_made_up_defaults():
    import warnings

    from oct3d.lightning import VideoClassifier
    from oct3d.lightning.modules import restore_preprocessing

    saved = {"num_frames": 16, "sampling_rate": 4, "crop_size": 112, "short_side": 128, "mean": [0.5] * 3,
             "std": [0.5] * 3, "test_clips": 10, "test_crops": 3}
    model = VideoClassifier(num_classes=3, preprocessing=dict(saved))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restore_preprocessing(model, saved, None)  # no data module that says what it applies: nothing changes
        restore_preprocessing(model, saved, {**saved, "test_clips": 2})  # evaluation settings may change freely
    assert model.preprocessing["crop_size"] == 112
    with pytest.warns(UserWarning, match=r"crop_size: checkpoint 112, now 96"):
        restore_preprocessing(model, saved, {**saved, "crop_size": 96})
    assert model.preprocessing["crop_size"] == 96 and model.hparams["preprocessing"]["crop_size"] == 96
    fresh = VideoClassifier(num_classes=3)
    restore_preprocessing(fresh, saved, None)
    assert fresh.preprocessing == saved
    # A data module without the attributes the classifier reads does not describe its preprocessing;
    # the Kinetics data module does, target_fps (off) included.
    from datamodules import KineticsDataModule

    assert model._applied_preprocessing(object()) is None and model._applied_preprocessing(None) is None
    kinetics = KineticsDataModule("unused", num_frames=16, sampling_rate=4, crop_size=112)
    applied = model._applied_preprocessing(kinetics)
    assert applied["num_frames"] == 16 and applied["target_fps"] is None
    # A setting turned off in this run (the checkpoint sampled at 30 fps) is not kept from the checkpoint.
    with pytest.warns(UserWarning, match=r"target_fps: checkpoint 30.0, now None"):
        restore_preprocessing(model, {**saved, "target_fps": 30.0}, {**saved, "target_fps": None})
    assert model.preprocessing["target_fps"] is None
    # A checkpoint from before a setting existed holds it off: no warning against an explicit False.
    volume = {"patch_size": [8, 8, 8], "normalization": "zscore"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restore_preprocessing(model, volume, {**volume, "crop_foreground": False})
    with pytest.warns(UserWarning, match=r"crop_foreground: checkpoint True, now False"):
        restore_preprocessing(model, {**volume, "crop_foreground": True}, {**volume, "crop_foreground": False})


def test_fine_tuning_from_a_checkpoint_with_another_class_count(tiny_kinetics, tiny_video_checkpoint, tmp_path):
    """init_weights: the backbone comes from the checkpoint, the classifier of the new class count is new;
    the run's own checkpoint no longer needs the file."""
    import lightning.pytorch as pl

    from datamodules import KineticsDataModule
    from oct3d.lightning import VideoClassifier
    from oct3d.lightning.modules import load_initial_weights

    kwargs = {"alpha": 0.5, "base_width": 8, "depths": [1, 1, 1, 1]}
    source = torch.load(tiny_video_checkpoint, weights_only=True)["state_dict"]
    model = VideoClassifier(backbone="oct_i3d_r50", num_classes=5, backbone_kwargs=kwargs,
                            init_weights=str(tiny_video_checkpoint))
    data = KineticsDataModule(str(tiny_kinetics), num_frames=4, sampling_rate=2, crop_size=32, min_short_side=32,
                              max_short_side=36, batch_size=2, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loaded = []
    real_start = VideoClassifier.on_fit_start

    def spy(self):
        real_start(self)
        loaded.append({k: v.clone() for k, v in self.model.state_dict().items()})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VideoClassifier, "on_fit_start", spy)
        trainer.fit(model, datamodule=data)
    weights = loaded[0]
    torch.testing.assert_close(weights["conv1.weight"], source["model.conv1.weight"])
    assert weights["fc.weight"].shape[0] == 5
    assert model.hparams["init_weights"] is None and model.init_weights_from == str(tiny_video_checkpoint)
    # The run's checkpoint names its source and rebuilds from its hyperparameters alone, as LightningCLI's
    # --ckpt_path does (every saved hyperparameter must be a constructor argument).
    trainer.save_checkpoint(tmp_path / "tuned.ckpt")
    saved = torch.load(tmp_path / "tuned.ckpt", weights_only=True)
    assert saved["oct3d"]["init_weights_from"] == str(tiny_video_checkpoint)
    rebuilt = VideoClassifier(**saved["hyper_parameters"])
    rebuilt.on_load_checkpoint(saved)
    assert rebuilt.init_weights_from == str(tiny_video_checkpoint)
    # A fit that resumes from a checkpoint never reads init_weights (the restore brings the weights).
    resumed = VideoClassifier(backbone="oct_i3d_r50", num_classes=5, backbone_kwargs=kwargs,
                              init_weights=str(tmp_path / "gone.ckpt"))
    resumed.on_load_checkpoint(saved)
    resumed.on_fit_start()  # would raise FileNotFoundError if it tried
    with pytest.raises(ValueError, match="holds another network: weights have other shapes"):
        load_initial_weights(VideoClassifier(backbone="oct_i3d_r50", num_classes=3,
                                             backbone_kwargs={**kwargs, "base_width": 16}).model,
                             tiny_video_checkpoint, 3)
    with pytest.raises(FileNotFoundError, match=r"init_weights .*: no such file"):
        load_initial_weights(model.model, tmp_path / "missing.ckpt", 5)


def test_resuming_with_a_larger_batch_continues_the_schedule_where_the_run_was(tmp_path):
    """Fewer steps per epoch on resume (a larger batch, more devices): the restored step count is rescaled to
    the same point of the run in epochs, instead of running past the end of the new plan (lr 0 from there on)."""
    from oct3d.lightning.modules import WarmupCosine

    samples = _views([[1.0, 0.0, 0.0]] * 12, [0] * 12, list(range(12)))
    rates: list[tuple[int, float]] = []

    class Data(pl.LightningDataModule):
        def __init__(self, batch_size: int) -> None:
            super().__init__()
            self.batch_size = batch_size

        def train_dataloader(self):
            return DataLoader(samples, batch_size=self.batch_size)

    class Rates(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            rates.append((trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"]))

    def fit(batch_size: int, epochs: int, ckpt_path=None) -> None:
        model = VideoClassifier(backbone="_test_mean_logits", num_classes=3, lr=0.1, warmup_epochs=1,
                                warmup_start_factor=0.1)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(tmp_path),
                             callbacks=[Rates(), pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True)])
        trainer.fit(model, datamodule=Data(batch_size), ckpt_path=ckpt_path)

    fit(2, 2)  # 6 steps per epoch: stops at step 12
    rates.clear()
    fit(4, 4, ckpt_path=str(tmp_path / "last.ckpt"))  # 3 steps per epoch, 12 in all
    epoch, lr = rates[0]
    # Half-way through the run in epochs: step 6 of the new 12, after one epoch (3 steps) of warm-up.
    assert epoch == 2 and lr == pytest.approx(0.1 * WarmupCosine(3, 12, 0.1, 0.0)(6)) and lr > 0.05
    assert rates[-1][1] > 0  # the run ends on the cosine's last step, not past it


def test_a_repeated_view_counts_once_in_its_videos_average():
    """DDP's sampler pads with a repeat of the first view; counted twice, video 0's average would flip to class 0."""
    samples = _views([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]], labels=[1, 1, 1, 2],
                     video_index=[0, 0, 0, 1])
    for view, sample in enumerate(samples):
        sample["view_index"] = view
    model = VideoClassifier(backbone="_test_mean_logits", num_classes=3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (once,) = trainer.test(model, DataLoader(samples, batch_size=2), verbose=False)
    (padded,) = trainer.test(model, DataLoader([*samples, samples[0], samples[0]], batch_size=2), verbose=False)
    assert once["test/top1"] == pytest.approx(1.0) and padded == once
