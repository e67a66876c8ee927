"""The benchmark tool runs end to end on a tiny model and writes its table and plot (no timing asserted)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

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


def test_cpu_peak_memory_counts_the_step_tensors():
    """CPU peak memory is exact tensor accounting: at least the input-sized first activation, more in training."""
    import torch

    from oct3d.benchmark import _peak_memory

    with _peak_memory(torch.device("cpu")) as peak:
        a = torch.ones(1024, 1024)  # 4 MiB live at the peak
        b = torch.ones(512, 1024)  # 2 MiB
        del a, b
        c = torch.ones(256, 1024)  # 1 MiB, allocated after the peak
    assert peak[0] == 6 * 2**20
    del c
    inference, train = (
        benchmark_models("oct_i3d_r50", [0.5], ["spatial"], [mode], batch_size=1, frames=4, size=32,
                         warmup=1, iters=1, model_kwargs=TINY)[0]
        for mode in ("inference", "train")
    )
    assert 0 < inference.peak_bytes < train.peak_bytes
    assert 0 < inference.peer_peak_bytes < train.peer_peak_bytes


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


def test_ops_table_times_every_kernel_choice(tmp_path):
    out = tmp_path / "ops.md"
    assert main(["--ops", "--iters", "1", "--output", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "operation" not in line]
    assert len(rows) == 12
    assert {row.split("|")[1].strip().split()[0] for row in rows} == {"avg", "L->H", "conv3d"}
    assert all(float(row.split("**")[1].rstrip("x")) > 0 for row in rows)


def test_peer_onednn_control_keeps_outputs_and_routes_every_conv3d(monkeypatch):
    import torch

    from oct3d.benchmark import route_conv3d_like_octave
    from oct3d.nn import kernels

    monkeypatch.setattr(kernels, "autotune", False)  # the control gives the peer the rule's choices
    onednn_calls, frame_calls = [], []
    real_onednn, real_frames = torch.mkldnn_convolution, kernels._conv_over_frames
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: onednn_calls.append(1) or real_onednn(*a))
    monkeypatch.setattr(kernels, "_conv_over_frames", lambda *a: frame_calls.append(1) or real_frames(*a))
    torch.manual_seed(0)
    # A foreign vanilla network (pytorchvideo's peers are plain nn.Conv3d): a 1x3x3 and a 3x3x3 layer.
    peer = torch.nn.Sequential(
        torch.nn.Conv3d(3, 8, (1, 3, 3), padding=(0, 1, 1)), torch.nn.BatchNorm3d(8), torch.nn.ReLU(),
        torch.nn.Conv3d(8, 8, 3, padding=1, bias=False), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(),
    ).eval()
    x = torch.randn(1, 3, 4, 16, 16)
    with torch.no_grad():
        expected = peer(x)
    expected_grads = torch.autograd.grad(peer(x).square().sum(), list(peer.parameters()))
    assert not onednn_calls and not frame_calls  # nn.Conv3d: PyTorch's own choice
    assert route_conv3d_like_octave(peer) == 2
    with torch.no_grad():
        torch.testing.assert_close(peer(x), expected, atol=1e-4, rtol=1e-4)
    assert onednn_calls and not frame_calls
    # Under autograd the 1xkxk convolutions run over frames: same gradients.
    for got, want in zip(torch.autograd.grad(peer(x).square().sum(), list(peer.parameters())), expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert frame_calls
    rows = benchmark_models(
        "oct_i3d_r50", [0.5], ["spatiotemporal"], ["inference"], batch_size=1, frames=4, size=32,
        warmup=0, iters=1, model_kwargs=TINY, peer_onednn=True,
    )
    assert len(rows) == 1 and math.isfinite(rows[0].time_ratio)


def test_peer_routing_keeps_temporal_padding_and_stride():
    import torch

    from oct3d.benchmark import route_conv3d_like_octave

    torch.manual_seed(0)
    convs = torch.nn.Sequential(torch.nn.Conv3d(4, 4, (1, 3, 3), padding=(1, 1, 1)),
                                torch.nn.Conv3d(4, 4, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)))
    x = torch.randn(1, 4, 3, 9, 9, requires_grad=True)
    expected = convs(x)
    route_conv3d_like_octave(convs)
    got = convs(x)
    assert got.shape == expected.shape == (1, 4, 5, 5, 5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_segmentation_trains_with_a_dense_target_and_json_output(tmp_path):
    """--mode train works for oct_unet3d (per-voxel target), --spatial takes a non-cubic volume, --json is written."""
    out = tmp_path / "unet.json"
    status = main([
        "--model", "oct_unet3d", "--model-kwargs", json.dumps({"base_width": 4, "depth": 2}), "--alphas", "0.5",
        "--mode", "train", "inference", "--batch-size", "2", "--spatial", "6x8x10", "--warmup", "0", "--iters", "1",
        "--json", str(out),
    ])
    assert status == 0
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["train", "inference"]
    assert all(r["shape"] == [2, 1, 6, 8, 10] and math.isfinite(r["time_ratio"]) and r["cpu"] for r in rows)
    assert {"mac_ratio", "setting", "torch", "threads", "autotune"} <= set(rows[0])
    assert rows[0]["builder_arguments"] == {"in_channels": 1, "num_classes": 2, "alpha": 0.5, "octave": "spatial",
                                            "base_width": 4, "depth": 2, "channels_last": None, "norm": "batch"}

    # --table renders saved runs (a folder of them) without timing anything.
    (tmp_path / "notes.txt").write_text("not a run")
    table_md = tmp_path / "runs.md"
    assert main(["--table", str(tmp_path), "--output", str(table_md)]) == 0
    lines = table_md.read_text().splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[2].startswith("| unet.json | oct_unet3d 0.5 spatial | train | 2 | 6x8x10 |")
    assert f"**{rows[0]['time_ratio']:.2f}x**" in lines[2] and rows[0]["setting"] in lines[2]


def test_table_rejects_what_is_not_a_saved_run(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"model": "x"}]))
    assert main(["--table", str(bad)]) == 2
    assert "bad.json is not a benchmark --json file" in capsys.readouterr().out
    assert main(["--table", str(tmp_path / "missing")]) == 2
    assert "no benchmark JSON file or folder" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--table", str(empty)]) == 2
    assert "no *.json benchmark files in folder" in capsys.readouterr().out


def test_table_refuses_timing_options_it_would_ignore(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--table", str(tmp_path), "--iters", "50", "--model", "oct_unet3d"])
    assert "it takes only --output, not --model, --iters" in capsys.readouterr().err


def test_bad_spatial_size_is_rejected():
    with pytest.raises(SystemExit):
        main(["--model", "oct_unet3d", "--spatial", "6x8xq"])
    with pytest.raises(ValueError, match="spatial must be 3 positive sizes"):
        benchmark_models("oct_unet3d", [0.5], modes=["inference"], spatial=(8, 8), warmup=0, iters=1,
                         model_kwargs={"base_width": 4, "depth": 2})


def test_peak_memory_silences_the_profilers_native_stderr(capfd):
    """Kineto's profiler_start / gpuGetDeviceCount lines go to fd 2 on CPU-only machines; the tool hides them."""
    import os

    import torch

    from oct3d.benchmark import _peak_memory, _quiet_native_stderr

    with _quiet_native_stderr():
        os.write(2, b"native noise\n")
    with _peak_memory(torch.device("cpu")) as peak:
        torch.ones(1000).sum()
    err = capfd.readouterr().err
    assert "native noise" not in err and "profiler_start" not in err and "gpuGetDeviceCount" not in err
    assert peak[0] is not None and peak[0] >= 4000
    os.write(2, b"after\n")
    assert "after" in capfd.readouterr().err  # the descriptor is restored


def test_malloc_setting_is_named_and_steady_by_default():
    from oct3d.benchmark import _setting, parse_args, steady_malloc

    args = parse_args(["--model", "oct_resnet50"])
    assert args.malloc == "steady"
    assert "steady malloc" in _setting(args, "cpu")
    assert "default malloc" in _setting(parse_args(["--malloc", "default"]), "cpu")
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert steady_malloc()


def test_peer_routed_control_keeps_outputs_and_uses_packed_weights_in_eval(monkeypatch):
    import torch
    import torchvision

    from oct3d.benchmark import route_convs_like_octave
    from oct3d.nn import kernels

    used = []
    real = kernels.run_conv
    monkeypatch.setattr(kernels, "run_conv", lambda kernel, *a: used.append(kernel) or real(kernel, *a))
    torch.manual_seed(0)
    peer = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = peer(x)
    assert route_convs_like_octave(peer) == sum(isinstance(m, torch.nn.Conv2d) for m in peer.modules())
    kernels.clear_cache()
    with torch.no_grad(), kernels.force(conv="onednn_packed"):
        torch.testing.assert_close(peer(x), expected, atol=1e-4, rtol=1e-4)
    if kernels._PACKED_CONV is not None:
        assert "onednn_packed" in used
    peer.train()
    used.clear()
    with torch.no_grad(), kernels.force(conv="onednn_packed"):
        peer(x)
    assert "onednn_packed" not in used  # training mode: no cached weight copies
    kernels.clear_cache()


def test_entry_points_apply_steady_malloc_unless_disabled(monkeypatch):
    """oct3d's CLIs set glibc's thresholds at start-up; OCT3D_STEADY_MALLOC=0 leaves malloc alone."""
    import oct3d.system as system

    calls = []
    monkeypatch.setattr(system, "steady_malloc", lambda: calls.append(1) or True)
    for value in ("0", "off", "False"):
        monkeypatch.setenv("OCT3D_STEADY_MALLOC", value)
        assert system.steady_malloc_unless_disabled() is False
    assert calls == []
    monkeypatch.delenv("OCT3D_STEADY_MALLOC")
    assert system.steady_malloc_unless_disabled() is True and calls == [1]


def test_steady_malloc_falls_back_to_old_glibcs_largest_threshold(monkeypatch):
    """glibc < 2.35 rejects an mmap threshold above 32 MiB: the trim threshold is still set, and 32 MiB is used."""
    import ctypes
    import platform

    import oct3d.system as system

    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 0 if option == -3 and value > system.OLD_GLIBC_MAX_MMAP else 1

    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert system.steady_malloc()
    assert calls == [(-1, system.TRIM_THRESHOLD), (-3, system.MMAP_THRESHOLD), (-3, system.OLD_GLIBC_MAX_MMAP)]


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "nope"], "is not a registered model"),
    (["--alphas", "1.5"], r"--alphas must lie in \[0, 1\)"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--model-kwargs", "{bad"], "--model-kwargs must be a JSON object"),
    (["--model-kwargs", "[1]"], "--model-kwargs must be a JSON object"),
    (["--json", "/no/such/folder/a.json"], "does not exist"),
    (["--fuse"], "--fuse folds BatchNorm for inference only"),
    (["--scaling", "batch", "--plot", "x.png"], "--plot draws ratios against alpha"),
    (["--ops", "--json", "ops.json"], "--ops prints a table"),
])
def test_bad_arguments_are_refused_before_any_timing(args, message, capsys):
    from oct3d.benchmark import main

    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_cpu_name_adds_family_model_and_vector_isa(monkeypatch, tmp_path):
    import builtins

    from oct3d import benchmark

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
                    "model name\t: AMD EPYC\nflags\t\t: fpu avx2 amx_tile\n\nprocessor\t: 1\n"
                    "model name\t: other\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(info if f == "/proc/cpuinfo" else f, *a, **k))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert benchmark.cpu_name() == "AMD EPYC (family 25 model 1, AVX2 + AMX)"
