"""The `oct3d` / `lightning` console scripts: configs, dispatch, fit end to end, resume, the ImageNet recipe."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from oct3d import cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _tiny_video_args(root: Path, out: Path) -> list[str]:
    # The demo model on the tiny dataset: 3 classes, 6 train videos of 16 frames at 32x32.
    return [
        "-c", str(CONFIGS / "oct_i3d_demo.yaml"), "--data.root", str(root), "--data.num_workers", "0",
        "--data.batch_size", "2", "--data.num_frames", "4", "--data.sampling_rate", "2", "--data.crop_size", "32",
        "--data.min_short_side", "32", "--data.max_short_side", "36", "--data.test_clips", "2",
        "--trainer.default_root_dir", str(out), *QUIET,
    ]


def _checkpoints(root: Path, name: str) -> list[Path]:
    return sorted(root.rglob(name), key=lambda p: p.stat().st_mtime)


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_print_config_is_complete(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "-c", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("oct3d.lightning.")
    assert printed["data"]["class_path"].startswith("datamodules.")
    # Classifiers keep the best top-1, segmenters the best mean Dice.
    segmenter = printed["model"]["class_path"].endswith(".VolumeSegmenter")
    assert printed["checkpoint"]["monitor"] == ("val/dice" if segmenter else "val/top1")
    assert printed["model"]["init_args"]["backbone"]


def test_kinetics400_config_is_the_paper_setting(capsys):
    with pytest.raises(SystemExit):
        cli.lightning_main(["fit", "-c", str(CONFIGS / "oct_i3d.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    model, data = printed["model"]["init_args"], printed["data"]["init_args"]
    assert model["backbone"] == "oct_i3d_r50"
    assert model["backbone_kwargs"] == {"alpha": 0.5, "octave": "spatial", "dropout": 0.5}
    assert (model["optimizer"], model["lr"], model["lr_reference_batch_size"]) == ("sgd", 0.1, 64)
    assert (model["momentum"], model["weight_decay"], model["warmup_epochs"]) == (0.9, 0.0001, 5)
    assert data["root"] == "data/kinetics400"
    assert (data["num_frames"], data["sampling_rate"], data["crop_size"]) == (8, 8, 224)
    assert (data["test_clips"], data["test_crops"]) == (10, 3)


def test_tools_are_dispatched(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "_load_tool", lambda spec: lambda argv: calls.append((spec, argv)) or 3)
    assert cli.main(["infer", "--checkpoint", "x.ckpt", "a.mp4"]) == 3
    assert cli.main(["table", "--plot"]) == 3
    assert calls == [("oct3d.inference:main", ["--checkpoint", "x.ckpt", "a.mp4"]),
                     ("oct3d.model_table:main", ["--plot"])]
    assert set(cli.TOOLS) >= {"table", "bench", "infer", "export", "segment", "bench-data"}


def test_console_scripts_are_installed():
    # Running them is covered by tests/test_ddp.py (`lightning fit` in a subprocess).
    bin_dir = Path(sys.executable).parent
    for script, entry in (("lightning", "lightning_main"), ("oct3d", "main")):
        path = shutil.which(script, path=str(bin_dir))
        assert path, f"console script {script} is not installed; run pip install -e ."
        assert "oct3d.cli" in Path(path).read_text() and entry in Path(path).read_text()


def test_fit_then_resume_continues_epoch_and_step(tiny_kinetics, tmp_path, caplog):
    args = _tiny_video_args(tiny_kinetics, tmp_path)
    cli.main(["fit", *args, "--trainer.max_epochs", "1"])
    (first,) = _checkpoints(tmp_path, "last.ckpt")
    state = torch.load(first, weights_only=True)
    assert (state["epoch"], state["global_step"]) == (0, 3)  # 6 videos / batch 2
    assert state["oct3d"]["class_names"] == ["moving left", "moving right", "moving up"]
    assert state["hyper_parameters"]["num_classes"] == 3  # linked from data.num_classes
    assert _checkpoints(tmp_path, "best-epoch000-top1*.ckpt")

    # "last": the newest last.ckpt of the earlier runs' version folders (this run logs into a new one).
    # The checkpoint holds the schedule's step, not its plan: the longer run plans its curve over 6 steps.
    assert state["lr_schedulers"][0]["lr_lambdas"] == [{}]
    cli.main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    resumed = _checkpoints(tmp_path, "last.ckpt")[-1]
    assert resumed != first
    state = torch.load(resumed, weights_only=True)
    assert (state["epoch"], state["global_step"]) == (1, 6)

    # test: 3 test videos x 2 clips, aggregated per video; predict: softmax per view
    from oct3d.lightning.cli import OctCLI

    with caplog.at_level("INFO"):
        OctCLI(args=["validate", *args, "--ckpt_path", str(resumed), "--trainer.logger", "false"])
    assert "epoch 1 step 6: val/top1=" in caplog.text  # the checkpoint's place, not the idle loop's 0 / 0
    tested = OctCLI(args=["test", *args, "--ckpt_path", str(resumed), "--trainer.logger", "false"])
    assert tested.trainer.callback_metrics["test/num_videos"] == 3
    with caplog.at_level("INFO"):
        predicted = OctCLI(args=["predict", *args, "--ckpt_path", str(resumed), "--trainer.logger", "false"])
    assert "lightning predict writes no file unless a prediction writer" in caplog.text
    batches = predicted.trainer.predict_loop.predictions
    probs = torch.cat([b["probs"] for b in batches])
    assert probs.shape == (6, 3) and torch.allclose(probs.sum(1), torch.ones(6))
    assert torch.cat([b["video_index"] for b in batches]).tolist() == [0, 0, 1, 1, 2, 2]

    # A checkpoint file, like "last", keeps the command line's settings (Lightning would load the
    # checkpoint's hyperparameters over them).
    again = OctCLI(args=["fit", *args, "--trainer.max_epochs", "3", "--ckpt_path", str(resumed),
                         "--model.init_args.lr", "0.0123", "--trainer.logger", "false"])
    assert again.model.hparams.lr == 0.0123 and again.trainer.current_epoch == 3


def test_imagenet_recipe_end_to_end(tiny_imagefolder, tmp_path, capsys):
    cli.main([
        "fit", "-c", str(CONFIGS / "oct_resnet50_imagenet.yaml"), "--data.root", str(tiny_imagefolder),
        "--data.batch_size", "4", "--data.eval_batch_size", "6", "--data.num_workers", "0",
        "--data.crop_size", "32", "--data.resize_size", "36", "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.precision", "32-true",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path),
        *QUIET,
    ])
    (last,) = _checkpoints(tmp_path, "last.ckpt")
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 2
    meta = state["oct3d"]
    assert (meta["task"], meta["backbone"], meta["num_classes"]) == ("image", "oct_resnet50", 3)
    assert meta["class_names"] == ["n01440764", "n01443537", "n01484850"]
    assert meta["preprocessing"]["crop_size"] == 32 and meta["preprocessing"]["resize_size"] == 36
    assert state["hyper_parameters"]["label_smoothing"] == 0.1
    # lr 0.1 per 256 images, batch 4 on one device: peak 0.1 * 4 / 256
    assert state["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(0.1 * 4 / 256)

    # Inference reads every format ImageFolder trains on (PIL), and names a broken file without native paths.
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    source = next((tiny_imagefolder / "val").rglob("*.JPEG"))
    for suffix in (".bmp", ".tif", ".png"):
        Image.open(source).save(images / f"a{suffix}")
    (images / "broken.jpg").write_bytes(source.read_bytes()[:200])
    out = tmp_path / "preds.jsonl"
    assert cli.main(["infer", "--checkpoint", str(last), "--output", str(out), str(images)]) == 1
    rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert all("error" not in rows[f"a{suffix}"] for suffix in (".bmp", ".tif", ".png"))
    assert "broken.jpg" in rows["broken.jpg"]["error"] and ".cpp" not in rows["broken.jpg"]["error"]
    # Options that choose video views are refused for an image classifier rather than ignored.
    assert cli.main(["infer", "--checkpoint", str(last), "--window", "2", "--views", "3", str(images)]) == 2
    assert "--views and --window choose views of videos" in capsys.readouterr().err


def test_fit_over_broken_videos_finishes_and_reports_them(broken_kinetics, tmp_path):
    from datamodules import DataErrorReport
    from oct3d.lightning.cli import OctCLI

    args = _tiny_video_args(broken_kinetics, tmp_path)
    run = OctCLI(args=["fit", *args, "--data.batch_size", "3", "--trainer.max_epochs", "1"])
    assert run.trainer.state.finished and run.trainer.global_step == 3  # 9 listed train videos / batch 3
    (report,) = [c for c in run.trainer.callbacks if isinstance(c, DataErrorReport)]
    reported = {(r.stage, Path(entry.split(".mp4")[0]).name + ".mp4") for r in report.history for entry in r.failures}
    assert reported == {
        ("train", "trunc000001_000000_000002.mp4"),
        ("train", "missng00002_000000_000002.mp4"),
        ("train", "notvideo003_000000_000002.mp4"),
        ("validation", "truncval004_000000_000002.mp4"),
    }


def test_a_refused_setting_is_one_error_line_and_exit_2(tiny_kinetics, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OCT3D_TRACEBACK", raising=False)
    missing = tmp_path / "no_such_dataset"
    assert cli.lightning_main(["fit", *_tiny_video_args(missing, tmp_path / "logs")]) == 2
    err = capsys.readouterr().err
    assert f"error: no annotations under {missing}" in err and "Traceback" not in err
    # Raised during the run, by the checkpoint resolver: also one line.
    assert cli.main(["validate", *_tiny_video_args(tiny_kinetics, tmp_path / "empty"), "--ckpt_path", "last"]) == 2
    assert "error: --ckpt_path last: no last*.ckpt under" in capsys.readouterr().err
    # A class argument the module refuses reaches us wrapped by jsonargparse ("Does not validate against
    # any of the Union subtypes"): the module's own message, still one line.
    for override, message in ((["--model.lr", "-1"], "error: lr must be > 0, got -1.0"),
                              (["--data.crop_size", "0"], "error: crop_size must be a positive int, got 0"),
                              (["--trainer.sync_batchnorm", "true", "--trainer.accelerator", "cpu"],
                               "error: --trainer.sync_batchnorm true needs GPUs")):
        assert cli.lightning_main(["fit", *_tiny_video_args(tiny_kinetics, tmp_path / "logs"), *override]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "Union subtypes" not in err
    monkeypatch.setenv("OCT3D_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="no annotations under"):
        cli.lightning_main(["fit", *_tiny_video_args(missing, tmp_path / "logs")])


def test_an_unknown_option_is_a_short_message_naming_the_class(tiny_kinetics, tmp_path, capsys):
    # (The program name is the script's: `lightning` when installed, pytest's here.)
    for key, class_path in (("model", "oct3d.lightning.VideoClassifier"), ("data", "datamodules.KineticsDataModule")):
        with pytest.raises(SystemExit) as exit_info:
            cli.lightning_main(["fit", *_tiny_video_args(tiny_kinetics, tmp_path / "logs"), f"--{key}.no_such", "1"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"error: --{key}.no_such: {class_path} takes no option 'no_such' (`" in err
        assert f" fit --{key}.help {class_path}` lists the ones it takes)" in err and "Union subtypes" not in err
        # One usage line, not the usage of every option (about 70 lines).
        assert err.count("\n") <= 4 and err.splitlines()[0].endswith(" fit [-h] [-c CONFIG] [options]")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU config runs where there is a GPU")
def test_the_gpu_config_on_a_machine_without_a_gpu_says_what_to_override(tiny_kinetics, capsys, monkeypatch):
    monkeypatch.delenv("OCT3D_TRACEBACK", raising=False)
    assert cli.lightning_main(["fit", "-c", str(CONFIGS / "oct_i3d.yaml"), "--data.root", str(tiny_kinetics)]) == 2
    err = capsys.readouterr().err
    assert "error: No supported gpu backend found!" in err and "--trainer.accelerator cpu" in err
    assert "Traceback" not in err


def test_errors_outside_oct3d_checks_keep_their_traceback(tmp_path, monkeypatch):
    from oct3d.lightning import cli as lightning_cli

    def fails(*args, **kwargs):
        raise ValueError("from elsewhere")

    monkeypatch.setattr(lightning_cli, "OctCLI", fails)
    with pytest.raises(ValueError, match="from elsewhere"):
        lightning_cli.run_cli(["fit"])


def test_the_learning_rate_is_logged_whenever_a_logger_is(tiny_kinetics, tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor

    from oct3d.lightning.cli import OctCLI

    args = _tiny_video_args(tiny_kinetics, tmp_path)

    def monitors(*extra: str) -> int:
        trainer = OctCLI(args=[*args, *extra], run=False).trainer
        return sum(isinstance(callback, LearningRateMonitor) for callback in trainer.callbacks)

    assert monitors() == 1  # the configs leave `logger: null`: Lightning's default TensorBoard logger
    assert monitors("--trainer.logger", "false") == 0


def test_an_unknown_oct3d_command_lists_every_command(capsys):
    from oct3d.cli import main as oct3d_main

    assert oct3d_main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'bogus'" in err and "fit" in err and "infer" in err and "segment" in err


def test_a_tool_whose_reader_closes_the_pipe_ends_without_a_traceback():
    import subprocess

    script = ("import sys\nfrom oct3d.system import run_tool\n"
              "def main():\n    for i in range(200000):\n        print('line', i)\n    return 0\n"
              "sys.exit(run_tool(main))\n")
    done = subprocess.run(f"{sys.executable} -c \"{script}\" | head -1", shell=True, capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.stdout == "line 0\n"
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
    # A broken pipe that is not our output's (a worker's) is a real error and is raised.
    from oct3d.system import run_tool

    def worker_pipe_breaks():
        raise BrokenPipeError("a worker's pipe")

    with pytest.raises(BrokenPipeError, match="worker"):
        run_tool(worker_pipe_breaks)
