"""tools/export.py (oct3d.export): exported octave models match eager ones and feed tools/infer.py."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from oct3d.export import export_model
from oct3d.export import main as export_main
from oct3d.inference import ModelMetadata
from oct3d.inference import main as infer_main
from oct3d.models import get_model

TINY_I3D = {"alpha": 0.5, "base_width": 8, "depths": [1, 1, 1, 1]}


def _eager_and_meta(name: str, kwargs: dict, task: str, preprocessing: dict) -> tuple[torch.nn.Module, ModelMetadata]:
    torch.manual_seed(0)
    model = get_model(name, num_classes=5, **kwargs).eval()
    # Non-trivial BatchNorm statistics, so the exported graph's folded BN is really exercised.
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model, ModelMetadata(task, name, kwargs, 5, list("abcde"), preprocessing)


def _onnx_outputs(path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize(
    ("name", "kwargs", "task", "preprocessing"),
    [
        ("oct_i3d_r50", TINY_I3D, "video", {"num_frames": 4, "crop_size": 32}),
        # 45x45: odd octave maps (23 -> 12, 12 -> 6 -> 3 -> 2) in the exported graph.
        ("oct_resnet50", {"alpha": 0.5}, "image", {"crop_size": 45}),
    ],
)
def test_onnx_matches_eager(name, kwargs, task, preprocessing, tmp_path):
    model, meta = _eager_and_meta(name, kwargs, task, preprocessing)
    out = export_model(model, meta, "onnx", tmp_path / f"{name}.onnx")
    x = torch.randn(meta.input_shape(batch_size=3))  # exported at batch 2: the batch axis is dynamic
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(_onnx_outputs(out, x), expected, atol=1e-4, rtol=0)
    sidecar = json.loads((tmp_path / f"{name}.onnx.json").read_text())
    assert sidecar["format"] == "onnx" and sidecar["oct3d"]["class_names"] == list("abcde")
    assert sidecar["input_shape"] == ["batch", *meta.input_shape()[1:]]


@pytest.mark.parametrize(("fmt", "suffix"), [("torchscript", ".pt"), ("exported-program", ".pt2"),
                                           ("torchscript", ".torchscript")])
def test_torch_formats_match_eager(fmt, suffix, tmp_path):
    """Each torch format equals eager, and load_predictor takes it by its sidecar whatever its suffix."""
    from oct3d.inference import load_predictor

    model, meta = _eager_and_meta("oct_i3d_r50", TINY_I3D, "video", {"num_frames": 4, "crop_size": 32})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note on an unusual suffix
        out = export_model(model, meta, fmt, tmp_path / f"i3d{suffix}")
    loaded = torch.jit.load(str(out)) if fmt == "torchscript" else torch.export.load(str(out)).module()
    x = torch.randn(meta.input_shape(batch_size=3))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5, rtol=0)
    assert load_predictor(out, device="cpu").source == fmt


def test_cli_export_then_infer_with_the_exported_file(tiny_kinetics, tiny_video_checkpoint, tmp_path, capfd):
    checkpoint = tiny_video_checkpoint
    onnx_path = tmp_path / "tiny.onnx"
    capfd.readouterr()
    assert export_main(["--checkpoint", str(checkpoint), "--format", "onnx", str(onnx_path)]) == 0
    printed = capfd.readouterr().out  # native output too: the exporter's C++ graph dump
    assert printed.strip() == f"wrote {onnx_path} and {onnx_path.name}.json"
    videos = sorted((tiny_kinetics / "test").rglob("*.mp4"))
    results = {}
    for model_file in (checkpoint, onnx_path):
        output = tmp_path / f"{model_file.suffix[1:]}.jsonl"
        assert infer_main(["--checkpoint", str(model_file), "--output", str(output), *map(str, videos)]) == 0
        results[model_file.suffix] = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(results[".onnx"]) == len(videos)
    for eager, exported in zip(results[".ckpt"], results[".onnx"]):
        assert [p["label"] for p in eager["topk"]] == [p["label"] for p in exported["topk"]]
        assert [p["score"] for p in eager["topk"]] == pytest.approx([p["score"] for p in exported["topk"]], abs=1e-4)
    # Without its sidecar an export is refused with a clear message.
    bare = tmp_path / "bare.onnx"
    shutil.copy(onnx_path, bare)
    assert infer_main(["--checkpoint", str(bare), str(videos[0])]) == 2


def test_export_refuses_foreign_checkpoints(tmp_path, capsys):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    assert export_main(["--checkpoint", str(foreign), "--format", "onnx", str(tmp_path / "x.onnx")]) == 2
    assert "not an oct3d checkpoint" in capsys.readouterr().err
    segmentation = tmp_path / "segmentation.ckpt"
    torch.save({"state_dict": {}, "oct3d": {"format_version": 1, "task": "segmentation"}}, segmentation)
    assert export_main(["--checkpoint", str(segmentation), "--format", "onnx", str(tmp_path / "y.onnx")]) == 2
    err = capsys.readouterr().err
    assert "segmentation checkpoint" in err and "`oct3d export` take the checkpoints of video and image" in err


def test_torch_export_with_dynamic_image_sizes():
    """Spatial sizes marked dynamic (multiples of the network's total stride) stay symbolic in the graph."""
    from torch.export import Dim

    from oct3d.models import oct_resnet26

    torch.manual_seed(0)
    model = oct_resnet26(num_classes=5).eval()
    # From twice the total stride, as the README says: a one-pixel low map would be specialised away.
    dynamic = {"x": {0: Dim("batch", min=1, max=8), 2: 32 * Dim("h", min=2, max=16), 3: 32 * Dim("w", min=2, max=16)}}
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=dynamic)
    for shape in ((1, 3, 64, 96), (3, 3, 128, 64), (1, 3, 64, 64)):
        x = torch.randn(shape)
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-4, rtol=1e-4)


def test_torch_export_of_the_3d_unet_with_dynamic_volume_sizes():
    """D, H and W of a volume marked dynamic stay symbolic through the octave branches, the strided
    levels and the decoder's resize to the skip size."""
    from torch.export import Dim

    from oct3d.models import oct_unet3d

    torch.manual_seed(0)
    model = oct_unet3d(alpha=0.5, base_width=8, depth=3).eval()
    dynamic = {"x": {2: 8 * Dim("d", min=1, max=8), 3: 8 * Dim("h", min=1, max=8), 4: 8 * Dim("w", min=1, max=8)}}
    program = torch.export.export(model, (torch.randn(1, 1, 16, 16, 16),), dynamic_shapes=dynamic)
    for shape in ((1, 1, 24, 16, 32), (1, 1, 8, 40, 16)):
        x = torch.randn(shape)
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-4, rtol=1e-4)


def test_onnx_export_without_its_packages_is_a_usage_error(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert export_main(["--checkpoint", str(tmp_path / "any.ckpt"), "--format", "onnx", str(tmp_path / "m.onnx")]) == 2
    assert "needs onnxscript: pip install 'oct3d[onnx]'" in capsys.readouterr().err


def test_onnx_export_writes_the_opset_asked_for_and_never_overwrites_its_checkpoint(tiny_video_checkpoint, tmp_path,
                                                                                    capsys):
    import onnx

    out = tmp_path / "o13.onnx"
    assert export_main(["--checkpoint", str(tiny_video_checkpoint), "--format", "onnx", "--opset", "13", str(out)]) == 0
    assert [e.version for e in onnx.load(str(out)).opset_import if e.domain in ("", "ai.onnx")] == [13]
    copy = tmp_path / "model.ckpt"
    shutil.copy(tiny_video_checkpoint, copy)
    with pytest.raises(SystemExit) as stop:
        export_main(["--checkpoint", str(copy), "--format", "torchscript", str(copy)])
    assert stop.value.code == 2 and "also an input" in capsys.readouterr().err
    assert copy.read_bytes() == tiny_video_checkpoint.read_bytes()
    with pytest.raises(SystemExit) as stop:  # refused before any export is attempted
        export_main(["--checkpoint", str(copy), "--format", "onnx", "--opset", "5", str(tmp_path / "o5.onnx")])
    assert stop.value.code == 2 and "--opset must be an ONNX opset from 7 to" in capsys.readouterr().err
    assert not (tmp_path / "o5.onnx").exists()


def test_torchscript_export_of_a_residual_video_network_that_re_splits_its_octaves(tmp_path):
    """oct_r3d_18's basic blocks split a merged map again (to_octave): traced sizes are 0-d tensors there."""
    model, meta = _eager_and_meta("oct_r3d_18", {"alpha": 0.5, "base_width": 8}, "video",
                                  {"num_frames": 4, "crop_size": 32})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings
        out = export_model(model, meta, "torchscript", tmp_path / "r3d.pt")
    x = torch.randn(meta.input_shape(batch_size=2))
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(out))(x), model(x), atol=1e-5, rtol=0)
