"""oct3d.octavize: the must-convert models (torchvision, video, pytorchvideo, MONAI, the README's 3D network).

For each model: alpha 0 computes exactly the original, alpha .5 costs fewer multiply-adds and trains
(gradients reach every parameter, the loss goes down), and odd sizes run where the original allows them.
Models are small (widths, inputs) and built once per module.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from layouts import map_layouts
from torch import nn

from oct3d import fuse, octavize
from oct3d.convert import ConversionError, describe_plan
from oct3d.convert.examples import TinySegNet
from oct3d.convert.layers import KernelConv2d, KernelConv3d, OctStochasticDepth, kernel_conv
from oct3d.nn import OctConv, fold, kernels
from oct3d.profiling import activation_memory, count_macs, measure

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pytorchvideo and MONAI emit deprecation warnings on import
    from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet
    from pytorchvideo.models.resnet import create_resnet


_I3D = dict(
    stem_conv_kernel_size=(5, 7, 7), stage1_pool=nn.MaxPool3d,
    stage_conv_a_kernel_size=((3, 1, 1), [(3, 1, 1), (1, 1, 1)], [(3, 1, 1), (1, 1, 1)], [(1, 1, 1), (3, 1, 1)]),
)


def _ptv(config: dict, frames_at_head: int) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_resnet(**config, stem_dim_out=16, model_num_class=5, head_pool_kernel_size=(frames_at_head, 1, 1))


# name: (builder, example input, odd input or None, octave). MONAI's UNet, SegResNet and DynUNet reject
# odd sizes themselves (their skips no longer match); BasicUNet has its own test below.
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64), (1, 3, 67, 61), "spatial"),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 64, 64), (1, 3, 65, 63),
                     "spatial"),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=10), (2, 3, 64, 64), (1, 3, 65, 63), "spatial"),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), (2, 3, 64, 64), (1, 3, 65, 63),
                        "spatial"),
    "r3d_18": (lambda: torchvision.models.video.r3d_18(num_classes=5), (2, 3, 8, 24, 24), (1, 3, 9, 25, 23),
               "spatiotemporal"),
    "i3d_r50": (lambda: _ptv(_I3D, 2), (2, 3, 4, 32, 32), (1, 3, 5, 33, 31), "spatial"),
    "slow_r50": (lambda: _ptv(dict(stem_conv_kernel_size=(1, 7, 7)), 4), (2, 3, 4, 32, 32), (1, 3, 5, 33, 31),
                 "spatial"),
    "monai_unet": (lambda: UNet(3, 1, 2, (8, 16, 32, 64, 128), (2, 2, 2, 2), num_res_units=1), (2, 1, 32, 32, 32),
                   None, "spatial"),
    "monai_basicunet": (lambda: BasicUNet(3, 1, 2, features=(8, 8, 16, 32, 64, 8)), (2, 1, 32, 32, 32), None,
                        "spatial"),
    "monai_segresnet": (lambda: SegResNet(3, 8, 1, 2), (2, 1, 32, 32, 32), None, "spatial"),
    "monai_dynunet": (lambda: DynUNet(3, 1, 2, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[8, 16, 32, 64]),
                      (2, 1, 32, 32, 32), None, "spatial"),
    "readme_tinysegnet": (lambda: TinySegNet(), (2, 1, 5, 32, 32), (1, 1, 7, 33, 29), "spatial"),
}


def _randomize_norms(model: nn.Module) -> None:
    # Random statistics and affine parameters, so that a wrongly split norm shows at alpha 0.
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        for name, low, high in (("running_mean", -0.5, 0.5), ("running_var", 0.5, 1.5), ("weight", 0.5, 1.5),
                                ("bias", -0.5, 0.5)):
            tensor = getattr(m, name, None)
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and isinstance(tensor, torch.Tensor):
                tensor.data.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)


class Zoo:
    """Each model, its example input and its alpha-.5 conversion, built once for the module."""

    def __init__(self) -> None:
        self.cache: dict[str, tuple[nn.Module, torch.Tensor, nn.Module]] = {}

    def __call__(self, name: str) -> tuple[nn.Module, torch.Tensor, nn.Module]:
        if name not in self.cache:
            builder, shape, _, octave = MODELS[name]
            torch.manual_seed(0)
            model = builder().eval()
            _randomize_norms(model)
            x = torch.randn(shape)
            self.cache[name] = (model, x, octavize(model, 0.5, example_input=x, octave=octave))
        return self.cache[name]


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo()


@pytest.mark.parametrize("name", list(MODELS))
def test_alpha0_computes_the_original(name, zoo):
    model, x, _ = zoo(name)
    twin = octavize(model, 0.0, example_input=x, octave=MODELS[name][3], validate=False).eval()
    probe = torch.randn_like(x)
    with torch.no_grad():
        # On CPU the twin runs channels_last (different summation order): rounding-level differences.
        torch.testing.assert_close(twin(probe), model(probe), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_alpha_half_costs_fewer_macs_and_trains(name, zoo):
    model, x, converted = zoo(name)
    ratio = count_macs(converted, x) / count_macs(model, x)
    assert ratio < 0.9, f"{name}: alpha .5 costs {ratio:.2f} of the original"
    assert any(a_out > 0 for _, a_out, _ in converted.octave_plan.values())

    snapshot = {k: v.clone() for k, v in converted.state_dict().items()}
    torch.manual_seed(0)
    with torch.no_grad():
        target = torch.randn_like(model.eval()(x))
    # Training mode (dropout and stochastic depth off, so that no branch is dropped by chance): a backward
    # pass reaches every parameter.
    net = converted.train()
    for m in net.modules():
        if isinstance(m, (nn.Dropout, torchvision.ops.StochasticDepth, OctStochasticDepth)):
            m.eval()
    F.mse_loss(net(x), target).backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"{name}: no gradient reaches {missing[:5]}"
    # A few clipped SGD steps lower the loss. BatchNorm statistics are frozen (eval mode) so that the
    # objective is smooth and deterministic; with batch-2 statistics a step on these random networks
    # may go either way.
    net.load_state_dict(snapshot)  # undo the training-mode pass's update of the running statistics
    net.eval()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.mse_loss(net(x), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[2] < losses[1] < losses[0], losses
    net.load_state_dict(snapshot)  # leave the shared conversion as it was built
    net.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", [n for n, spec in MODELS.items() if spec[2] is not None])
def test_odd_sizes_run_like_the_original(name, zoo):
    model, _, converted = zoo(name)
    odd = torch.randn(MODELS[name][2])
    with torch.no_grad():
        assert converted.eval()(odd).shape == model(odd).shape


def test_basicunet_odd_sizes_when_converted_at_an_odd_size():
    # BasicUNet pads decoder maps to odd encoder sizes behind a Python test of the shapes; the converter
    # follows the branch the example takes and guards it, so convert with the size the network will see.
    torch.manual_seed(0)
    model = BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)).eval()
    odd = torch.randn(1, 1, 33, 31, 32)
    converted = octavize(model, 0.5, example_input=odd).eval()
    with torch.no_grad():
        assert converted(odd).shape == model(odd).shape
        with pytest.raises(RuntimeError, match="octavize traced 'upcat_"):
            converted(torch.randn(1, 1, 32, 32, 32))
    assert count_macs(converted, odd) < count_macs(model, odd)


# --------------------------------------------------------------------------- the paper's ResNet-50


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    _randomize_norms(model)
    return model


@pytest.mark.parametrize("pool_first", [None, False])
def test_resnet50_matches_the_hand_written_oct_resnet50(resnet50, pool_first, monkeypatch):
    from oct3d.models import load_vanilla, oct_resnet50

    converted = octavize(resnet50, 0.5, example_input=torch.randn(1, 3, 64, 64), pool_first=pool_first).eval()
    reference = load_vanilla(oct_resnet50(alpha=0.5, pool_first=pool_first), resnet50).eval()
    probe = torch.randn(2, 3, 97, 83)
    # Same kernels for both (timing may pick differently rounding ones for the two models), and the
    # BatchNorms run as modules in both (the builder's blocks fold them in inference, which rounds differently).
    monkeypatch.setattr(fold, "enabled", False)
    with torch.no_grad(), kernels.force(conv="default", low="cat", high="cat"):
        torch.testing.assert_close(converted(probe), reference(probe), rtol=1e-5, atol=1e-5)
    # The paper's placement and cost (Table 2: 2.4 GMACs at alpha .5), at full size.
    assert converted.octave_plan["conv1"][:2] == (0.0, 0.0)
    assert converted.octave_plan["layer1.0.conv1"][:2] == (0.0, 0.5)
    assert converted.octave_plan["layer4.0.conv1"][:2] == (0.5, 0.0)
    assert converted.octave_plan["layer4.0.downsample.0"][:2] == (0.5, 0.0)
    assert isinstance(converted.conv1, nn.Conv2d)  # the stem keeps its strided convolution
    assert getattr(converted.get_submodule("layer4.0.conv2"), "pool_first", False) is (pool_first is None)
    if pool_first is None:
        macs = count_macs(converted, (1, 3, 224, 224))
        assert macs == count_macs(reference, (1, 3, 224, 224))
        assert round(macs / 1e9, 1) == 2.4


@pytest.mark.parametrize(
    ("name", "builder", "kwargs"),
    [
        ("i3d_r50", "oct_i3d_r50", dict(base_width=16)),
        ("slow_r50", "oct_slow_r50", dict(base_width=16)),
        # R3D's layer1 adds the stem's output: the sum re-splits it, as the hand-written model's OctaveResplit.
        ("r3d_18", "oct_r3d_18", dict(octave="spatiotemporal")),
    ],
)
def test_video_resnets_match_the_hand_written_octave_models(name, builder, kwargs, zoo):
    import oct3d.models

    model, x, converted = zoo(name)
    octave_model = getattr(oct3d.models, builder)(alpha=0.5, num_classes=5, **kwargs)
    reference = oct3d.models.load_vanilla(octave_model, model)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)


def test_cost_table_tool():
    from oct3d.convert import table

    original, converted = table.mac_ratio(table.MODELS["README TinySegNet"], full_size=False)
    assert 0 < converted < 0.8 * original
    with pytest.raises(ValueError, match="unknown models"):
        table.markdown(["no such model"])


def test_resnext_grouped_convolutions_match_the_hand_written_model():
    from oct3d.models import load_vanilla, oct_resnext50_32x4d

    torch.manual_seed(0)
    model = torchvision.models.resnext50_32x4d().eval()
    _randomize_norms(model)
    x = torch.randn(1, 3, 64, 64)
    converted = octavize(model, 0.25, example_input=x).eval()
    reference = load_vanilla(oct_resnext50_32x4d(alpha=0.25), model).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x), rtol=1e-5, atol=1e-5)
    # At .125 the 128-channel grouped layers cannot split into 32 groups per branch: they stay vanilla.
    coarse = octavize(model, 0.125, example_input=x, validate=False)
    assert coarse.octave_plan["layer1.0.conv2"][:2] == (0.0, 0.0)
    assert "groups" in coarse.octave_plan["layer1.0.conv2"][2]


@pytest.mark.parametrize(("alpha", "paper_gmacs"), [(0.125, 3.6), (0.25, 3.1), (0.75, 1.9)])
def test_resnet50_has_the_paper_cost_at_every_alpha(resnet50, alpha, paper_gmacs):
    from oct3d.models import oct_resnet50

    converted = octavize(resnet50, alpha, example_input=torch.randn(1, 3, 64, 64), validate=False)
    macs = count_macs(converted, (1, 3, 224, 224))
    assert macs == count_macs(oct_resnet50(alpha=alpha), (1, 3, 224, 224))
    assert round(macs / 1e9, 1) == paper_gmacs


def test_dilated_segmentation_backbone_with_and_without_the_coarsest_rule():
    torch.manual_seed(0)
    model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3).eval()
    x = torch.randn(1, 3, 65, 63)
    paper = octavize(model, 0.5, example_input=x, validate=False).eval()
    dilated = octavize(model, 0.5, example_input=x, vanilla_coarsest=False).eval()
    with torch.no_grad():
        assert dilated(x)["out"].shape == model(x)["out"].shape == (1, 3, 65, 63)
    base = count_macs(model, x)
    assert count_macs(paper, x) > 0.9 * base  # layer2..layer4 and the head all sit at 1/8 resolution
    assert count_macs(dilated, x) < 0.6 * base


def test_placement_does_not_depend_on_the_example_size():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2().eval()
    small = octavize(model, 0.5, example_input=torch.randn(1, 3, 64, 64), validate=False)
    full = octavize(model, 0.5, example_input=torch.randn(1, 3, 224, 224), validate=False)
    assert small.octave_plan == full.octave_plan
    assert small.octave_plan["features.18.0"][2] == "coarsest resolution"


# --------------------------------------------------------------------------- an ordinary module


def test_converted_model_is_an_ordinary_module(zoo, tmp_path):
    from oct3d import fuse
    from oct3d.export import _without_in_place_ops

    model, x, converted = zoo("resnet18")
    converted.eval()
    with torch.no_grad():
        expected = converted(x)
        text = str(converted)
        assert "OctConv(" in text and "OctBatchNorm(" in text
        copied = copy.deepcopy(converted)
        torch.testing.assert_close(copied(x), expected)
        assert "layer1.0.conv1" in describe_plan(copied)
        again = octavize(model, 0.5, example_input=x, validate=False).eval()
        path = tmp_path / "converted.pt"
        torch.save(converted.state_dict(), path)
        again.load_state_dict(torch.load(path, weights_only=True))
        torch.testing.assert_close(again(x), expected)
        torch.testing.assert_close(fuse(converted, example_input=x)(x), expected, rtol=1e-4, atol=1e-4)
        compiled = torch.compile(converted, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
        program = torch.export.export(converted, (x,))
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)

    onnxruntime = pytest.importorskip("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter needs the octave fast path off (see oct3d/export.py).
        torch.onnx.export(_without_in_place_ops(converted), (x,), str(tmp_path / "m.onnx"), dynamo=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - expected.numpy()).max() < 1e-4


# --------------------------------------------------------------------------- errors, exclude, schedules, rules


class _Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(x.mean())  # a Python number from a traced tensor


class _Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1 if x.mean() > 0 else x - 1  # a Python branch on a tensor value


def _net(middle: nn.Module) -> nn.Sequential:
    def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 8, 2), *block(8, 16), middle, *block(16, 16), *block(16, 32, 2), *block(32, 32, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    ).eval()


def test_untraceable_module_is_named_and_exclude_keeps_it_opaque():
    model = _net(_Untraceable())
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ConversionError, match=r"module '6' \(_Untraceable\).*exclude=\('6',\)"):
        octavize(model, 0.5, example_input=x)
    converted = octavize(model, 0.5, example_input=x, exclude=("6",)).eval()
    assert converted.octave_plan["3"][1] == 0.0  # the octave closes before the excluded module
    assert converted.octave_plan["7"][:2] == (0.0, 0.5)  # and opens again after it
    with torch.no_grad():
        assert converted(x).shape == model(x).shape


def test_python_branch_on_a_tensor_is_guarded_not_silently_frozen():
    model = nn.Sequential(_Branchy(), *_net(nn.Identity())).eval()  # the branch tests the input's mean
    x = torch.rand(1, 3, 32, 32) + 0.5
    with pytest.warns(UserWarning, match=r"module '0' branches on a tensor's values .* exclude=\('0',\)"):
        converted = octavize(model, 0.5, example_input=x).eval()
    with torch.no_grad():
        assert converted(x).shape == model(x).shape
        with pytest.raises(RuntimeError, match="octavize traced"):
            converted(-x)  # the original takes the other branch here


class _MisTraced(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x if isinstance(x, torch.Tensor) else x  # an fx Proxy is no Tensor: the trace drops the 2 *


def test_a_wrong_trace_is_caught_at_conversion_time():
    model = _net(_MisTraced())
    with pytest.raises(ConversionError, match="trace of the model differs"):
        octavize(model, 0.5, example_input=torch.randn(1, 3, 32, 32))


def test_alpha_schedule_and_argument_errors():
    model = _net(nn.Identity())
    x = torch.randn(1, 3, 32, 32)
    converted = octavize(model, lambda name, module: 0.25 if name == "3" else 0.5, example_input=x)
    assert converted.octave_plan["3"][1] == 0.25
    assert converted.octave_plan["7"][:2] == (0.25, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        octavize(model, 1.0, example_input=x)
    with pytest.raises(ValueError, match="exclude"):
        octavize(model, 0.5, example_input=x, exclude=("nonexistent",))
    with pytest.raises(TypeError, match="example_input"):
        octavize(model, 0.5, example_input=(1, 3, 32, 32))


class _Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.pow(x, 2)


def test_the_rule_table_can_be_extended():
    from oct3d.convert import RULES
    from oct3d.convert.rules import ElementwiseRule

    model = _net(_Square())
    x = torch.randn(1, 3, 32, 32)
    default = octavize(model, 0.5, example_input=x)
    assert default.octave_plan["3"][1] == 0.0  # torch.pow has no rule: the octave closes before it
    square = ElementwiseRule(modules=(_Square,), functions=set(), methods=set())
    extended = octavize(model, 0.5, example_input=x, rules=[square, *RULES])
    assert extended.octave_plan["3"][1] == 0.5 and extended.octave_plan["7"][0] == 0.5


# --------------------------------------------------------------------------- MONAI: loss and sliding windows


@pytest.mark.parametrize("name", ["monai_unet", "monai_segresnet"])
def test_monai_dice_ce_training_and_sliding_window_inference(name, zoo):
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    builder, shape, _, octave = MODELS[name]
    net = octavize(builder(), 0.5, example_input=torch.randn(shape), octave=octave).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    image = torch.randn(2, 1, 32, 32, 32)
    label = (image > 0.5).long()  # a segmentation the network can learn in a few steps
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = loss_fn(net(image), label)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    net.eval()
    with torch.no_grad():
        volume = torch.randn(1, 1, 48, 40, 40)
        logits = sliding_window_inference(volume, roi_size=(32, 32, 32), sw_batch_size=2, predictor=net, overlap=0.25)
    assert logits.shape == (1, 2, 48, 40, 40) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["monai_segresnet", "resnet18"])
def test_converted_network_runs_channels_last_on_cpu(name, zoo):
    """By default a converted network runs its maps channels_last on CPU and hands 4D/5D outputs back in
    the caller's layout; ``channels_last=False`` keeps the original layout, with the same values."""
    model, x, fast = zoo(name)
    plain = octavize(model, 0.5, example_input=x, octave=MODELS[name][3], channels_last=False).eval()
    plain.load_state_dict(fast.state_dict())
    layouts = {fast: set(), plain: set()}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, seen=seen: seen.update(map_layouts(args[0])))
        for net, seen in layouts.items() for module in net.modules() if isinstance(module, OctConv)
    ]
    probe = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        # One thread too: there PyTorch's im2col fallback returns channels-first maps (kept vanilla convs).
        for count in {threads, 1}:
            torch.set_num_threads(count)
            with torch.no_grad():
                got, want = fast(probe), plain(probe)
    finally:
        torch.set_num_threads(threads)
        for hook in hooks:
            hook.remove()
    assert layouts[fast] == {"channels_last"} and layouts[plain] == {"contiguous"}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if got.dim() in (4, 5):
        assert got.is_contiguous()  # the caller's layout back
    from oct3d.nn.octave import CHANNELS_LAST_FORMATS

    convs = [m for m in fast.modules() if isinstance(m, torch.nn.modules.conv._ConvNd) and m.weight.dim() >= 4]
    assert convs and all(m.weight.is_contiguous(memory_format=CHANNELS_LAST_FORMATS[m.weight.dim()]) for m in convs)
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
    with pytest.raises(TypeError, match="channels_last"):
        octavize(model, 0.5, example_input=x, channels_last="yes")


def test_a_model_that_views_its_maps_gets_a_clear_error_in_channels_last(capfd):
    class ViewHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 8 * 8, 2)

        def forward(self, x):
            y = self.conv2(self.conv1(x))
            return self.fc(y.view(y.shape[0], -1))

    x = torch.randn(2, 3, 8, 8)
    capfd.readouterr()
    with pytest.raises(ConversionError, match="channels_last=False"):
        octavize(ViewHead(), 0.5, example_input=x, vanilla_coarsest=False)
    assert "FX-traced Module" not in capfd.readouterr().err  # only the ConversionError, no fx traceback print
    converted = octavize(ViewHead(), 0.5, example_input=x, vanilla_coarsest=False, channels_last=False)
    assert converted(x).shape == (2, 2)


class _TwoOutputs(nn.Module):
    """A small net whose outputs are a NamedTuple of a map and a flattened view of a map."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))
        return _Pair(map=y, tokens=y.flatten(2))


_Pair = __import__("collections").namedtuple("_Pair", ["map", "tokens"])


def test_channels_last_survives_torch_save_and_restores_every_output():
    """The layout nodes are recorded again when a saved GraphModule is loaded (its code is re-traced),
    and every output, NamedTuple fields and flattened views included, comes back contiguous."""
    import io

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    net = octavize(_TwoOutputs(), 0.5, example_input=x, vanilla_coarsest=False, channels_last=True).eval()
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert "in_model_layout" in loaded.code and "restore_caller_layout" in loaded.code
    seen = []
    loaded.c2.register_forward_pre_hook(lambda m, args: seen.extend(map_layouts(args[0])))
    with torch.no_grad():
        got, want = loaded(x), net(x)
    assert seen == ["channels_last"]
    assert isinstance(got, _Pair) and got.map.is_contiguous() and got.tokens.is_contiguous()
    torch.testing.assert_close(got.map, want.map)
    got.tokens.view(2, -1)  # a caller's .view works as on the original


def test_one_channel_input_traces_with_symbolic_strides():
    """A one-channel input is marked channels_last by a view, which torch.jit.trace records with the
    input's own strides: the trace is exact at another size."""
    torch.manual_seed(0)
    net = octavize(_TwoOutputs(1), 0.5, example_input=torch.randn(1, 1, 16, 16), vanilla_coarsest=False).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_MapOnly(net), torch.randn(1, 1, 16, 16), check_trace=False)
        other = torch.randn(1, 1, 24, 20)
        torch.testing.assert_close(traced(other), net(other).map, atol=1e-5, rtol=1e-5)


class _MapOnly(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).map


def test_a_forward_that_branches_on_training_gets_a_clear_error():
    """Deep supervision: more outputs in training than in eval; the error says why and what to do."""

    class DeepSupervised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
            self.head, self.aux = nn.Conv2d(16, 2, 1), nn.Conv2d(16, 2, 1)

        def forward(self, x):
            features = self.body(x)
            if self.training:
                return torch.stack([self.head(features), self.aux(features)], 1)
            return self.head(features)

    model = DeepSupervised()
    with pytest.raises(ConversionError, match=r"branches on self\.training.*model\.eval\(\)"):
        octavize(model, 0.5, example_input=torch.randn(1, 3, 16, 16))
    assert model.training  # the check ran on a copy
    octavize(model.eval(), 0.5, example_input=torch.randn(1, 3, 16, 16))


class _TwoPathway(nn.Module):
    """A model that takes one list of tensors and returns a list, like SlowFast's pathways."""

    def __init__(self) -> None:
        super().__init__()
        self.slow = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fast = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fuse = nn.Conv2d(24, 16, 3, padding=1)

    def forward(self, x):
        slow, fast = self.slow(x[0]), self.fast(x[1])
        return [self.fuse(torch.cat([slow, fast], 1)), fast]


def test_a_model_that_takes_a_list_converts_and_takes_the_same_list():
    torch.manual_seed(0)
    model = _TwoPathway().eval()
    example = [torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)]
    converted = octavize(model, 0.5, example_input=(example,))
    assert any(a_out > 0 for _, a_out, _ in converted.octave_plan.values())
    inputs = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    out = converted(list(inputs))
    assert isinstance(out, list) and [o.shape for o in out] == [o.shape for o in model(list(inputs))]
    at_zero = octavize(model, 0.0, example_input=(example,))
    for got, expected in zip(at_zero(list(inputs)), model(list(inputs))):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    converted.train()
    sum(o.sum() for o in converted(list(inputs))).backward()
    with pytest.raises(ConversionError, match=r"pass example_input=\(\[\.\.\.\],\)"):
        octavize(model, 0.5, example_input=example)  # the list taken as two positional arguments
    with pytest.raises(TypeError, match="each a tensor or a list of tensors"):
        octavize(model, 0.5, example_input=([example[0], "x"],))


def test_costs_and_fusion_take_a_list_input_as_octavize_does():
    torch.manual_seed(0)
    model = _TwoPathway().eval()
    example = [torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)]
    converted = octavize(model, 0.5, example_input=(example,)).eval()
    assert count_macs(converted, (example,)) < count_macs(model, (example,))
    assert activation_memory(converted, (example,)) < activation_memory(model, (example,))
    fused = fuse(converted, example_input=(example,))
    assert sum(isinstance(m, nn.Identity) for m in fused.modules()) == 3  # every BatchNorm folded
    for got, expected in zip(fused(list(example)), converted(list(example))):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match=r"taken as the model's positional arguments.*pass \(\[\.\.\.\],\)"):
        count_macs(model, example)
    with pytest.raises(TypeError, match=r"an input shape, a tensor, an Octave, or a tuple.*got \[1, 'a'\]"):
        count_macs(model, [1, "a"])
    with pytest.raises(ValueError, match="non-negative sizes"):
        fuse(converted, example_input=(1, 3, -1, 4))


def test_pytorchvideo_slowfast_converts():
    """SlowFast's blocks take [slow, fast] and write their outputs into that list; the pooling head is excluded."""
    from pytorchvideo.models.slowfast import create_slowfast

    torch.manual_seed(0)
    model = create_slowfast(model_num_class=5, head_pool_kernel_sizes=((2, 1, 1), (8, 1, 1))).eval()
    example = [torch.randn(1, 3, 2, 32, 32), torch.randn(1, 3, 8, 32, 32)]
    kept = list(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = octavize(model, 0.5, example_input=(example,), octave="spatial", exclude=("blocks.5",))
    assert example == kept  # the conversion's own runs did not write into the caller's list
    assert any(a_out > 0 for _, a_out, _ in converted.octave_plan.values())
    assert converted(list(example)).shape == model(list(example)).shape == (1, 5)
    assert count_macs(converted, (list(example),)) < count_macs(model, (list(example),))
    shapes = [t.shape for t in example]
    assert measure(model, (example,)).macs > 0  # SlowFast writes into its input list: the cost runs copy it
    assert [t.shape for t in example] == shapes
    # torch.export runs the graph through fx's Interpreter, whose immutable lists the kept head would write into.
    exported = torch.export.export(converted, (list(example),)).module()
    with torch.no_grad():
        assert torch.allclose(exported(list(example)), converted(list(example)), atol=1e-5)


def test_an_untraceable_module_deep_inside_a_block_also_names_the_block_and_the_top_module():
    deep = nn.Sequential(nn.Sequential(_Untraceable()))
    model = _net(deep)
    with pytest.raises(ConversionError, match=r"exclude=\('6\.0\.0',\) \(or a module around it: '6\.0' or '6'\)"):
        octavize(model, 0.5, example_input=torch.randn(1, 3, 32, 32))


class _DictOfPathways(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.b = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))

    def forward(self, x):
        return {"a": self.a(x[0]), "nested": ([self.b(x[1])], None)}


def test_list_input_networks_keep_any_output_structure_and_pickle(tmp_path):
    import io

    torch.manual_seed(0)
    model = _DictOfPathways().eval()
    example = [torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)]
    converted = octavize(model, 0.5, example_input=(example,))
    out = converted(list(example))
    assert set(out) == {"a", "nested"} and out["nested"][1] is None and out["nested"][0][0].shape == (1, 16, 16, 16)
    buffer = io.BytesIO()
    torch.save(converted, buffer)  # unpickling re-traces the generated code
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(again(list(example))["a"], out["a"])
    for wrong in ([*example, example[0]], example[:1]):  # fx would read the first two and ignore the rest
        with pytest.raises(ValueError, match="converted for inputs of 2 tensors"):
            converted(list(wrong))
    with pytest.raises(ValueError, match="converted for inputs of 2 tensors"):
        copy.deepcopy(converted)([*example, example[0]])
    assert again.octave_plan == converted.octave_plan
    buffer = io.BytesIO()
    torch.save(again, buffer)
    buffer.seek(0)
    twice = torch.load(buffer, weights_only=False)
    pruned = copy.deepcopy(again)
    pruned.graph.eliminate_dead_code()  # an fx pass must not drop the guard, whose result nothing uses
    pruned.recompile()
    for loaded in (again, copy.deepcopy(again), twice, pruned):  # the guard survives pickles and copies of them
        with pytest.raises(ValueError, match=r"converted for inputs of 2 tensors in its example.s structure, got 3"):
            loaded([*example, example[0]])
        torch.testing.assert_close(loaded(list(example))["a"], out["a"])


def test_a_module_that_writes_into_its_list_input_survives_specialised_control_flow():
    class WritesIntoInput(nn.Module):
        def forward(self, x):
            x[0] = x[0] * 2
            return torch.cat(x, 1)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
            self.c2 = nn.Conv2d(3, 8, 3, padding=1)
            self.mix = WritesIntoInput()
            self.out = nn.Conv2d(16, 4, 3, padding=1)

        def forward(self, x):
            y = self.mix([self.c1(x[0]), self.c2(x[1])])
            if y.shape[-1] % 2:  # evaluated on the example while tracing
                y = y[..., :-1]
            return self.out(y)

    example = [torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)]
    converted = octavize(Model().eval(), 0.5, example_input=(example,), exclude=("mix",))
    assert converted(list(example)).shape == (1, 4, 16, 16)


@pytest.mark.parametrize("case", ["resnet18", "tinyseg_odd", "segresnet", "basicunet"])
def test_a_converted_network_survives_torch_save_and_load_of_the_whole_module(case):
    """Unpickling a GraphModule re-traces its code on Proxies: every oct3d function in it must record itself."""
    import io

    torch.manual_seed(0)
    if case == "resnet18":
        model, x, kwargs = torchvision.models.resnet18(num_classes=4), torch.randn(1, 3, 64, 64), {}
    elif case == "tinyseg_odd":
        model, x, kwargs = TinySegNet(), torch.randn(1, 1, 5, 31, 33), {"octave": "spatial"}
    else:
        from monai.networks.nets import BasicUNet, SegResNet

        model = SegResNet(3, 8, 1, 2) if case == "segresnet" else BasicUNet(3, 1, 2, features=(8, 8, 16, 32, 64, 8))
        x, kwargs = torch.randn(1, 1, 32, 32, 32), {}
    converted = octavize(model.eval(), 0.5, example_input=x, **kwargs).eval()
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), converted(x))


def _plain_net(norm: nn.Module | None = None, middle: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), middle or nn.Conv2d(16, 16, 3, padding=1),
        norm or nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1),
    ).eval()


def test_frozen_parameters_stay_frozen():
    model = _plain_net()
    model.requires_grad_(False)
    model[3].bias.requires_grad_(True)  # e.g. fine-tuning only the norm shifts
    converted = octavize(model, 0.5, example_input=torch.randn(1, 3, 16, 16))
    assert {n for n, p in converted.named_parameters() if p.requires_grad} == {"3.bn_h.bias", "3.bn_l.bias"}


@pytest.mark.parametrize(
    "norm",
    [nn.BatchNorm2d(16, bias=False), nn.GroupNorm(4, 16, bias=False), nn.InstanceNorm2d(16, affine=True, bias=False)],
    ids=["batch", "group", "instance"],
)
def test_norms_without_a_shift_convert(norm):
    model = _plain_net(norm)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(octavize(model, 0.0, example_input=x)(x), model(x), atol=1e-5, rtol=1e-5)
    converted = octavize(model, 0.5, example_input=x)
    assert sum(p.numel() for p in converted.parameters()) == sum(p.numel() for p in model.parameters())
    assert converted(x).shape == model(x).shape


def test_a_parametrized_or_hooked_convolution_stays_vanilla_and_the_plan_says_why():
    from torch.nn.utils import parametrizations, parametrize

    model = _plain_net(middle=parametrizations.weight_norm(nn.Conv2d(16, 16, 3, padding=1)))
    model[5].register_forward_hook(lambda *args: None)
    converted = octavize(model, 0.5, example_input=torch.randn(1, 3, 16, 16))
    assert sum(p.numel() for p in converted.parameters()) == sum(p.numel() for p in model.parameters())
    assert parametrize.is_parametrized(converted.get_submodule("2"))  # the weight-normed layer, kept as it is
    plan = converted.octave_plan
    assert plan["2"] == (0.0, 0.0, "stays vanilla: a parametrized weight (weight_norm, spectral_norm, ...), "
                                   "which an octave layer would drop")
    assert plan["5"][2].startswith("stays vanilla: forward hooks")
    model = _plain_net()
    model[3].register_forward_hook(lambda *args: None)  # e.g. a user's feature hook on a norm
    model[5].register_full_backward_hook(lambda *args: None)
    converted = octavize(model, 0.5, example_input=torch.randn(1, 3, 16, 16))
    assert type(converted.get_submodule("3")) is nn.BatchNorm2d and converted.get_submodule("3")._forward_hooks
    assert converted.octave_plan["5"] == (0.0, 0.0, "stays vanilla: backward hooks, which an octave layer would drop")


def test_octavize_arguments_are_checked():
    model, x = _plain_net(), torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="atol must be a non-negative number"):
        octavize(model, 0.5, example_input=x, atol=-1)
    with pytest.raises(TypeError, match="atol must be a non-negative number, got 'x'"):
        octavize(model, 0.5, example_input=x, atol="x")
    with pytest.raises(TypeError, match="validate must be a bool"):
        octavize(model, 0.5, example_input=x, validate="no")
    with pytest.raises(TypeError, match=r"rules must be oct3d\.convert\.rules\.Rule instances, got object"):
        octavize(model, 0.5, example_input=x, rules=[object()])
    assert octavize(model, np.float32(0.5), example_input=x)(x).shape == (1, 4, 16, 16)


class _ShapeGuarded(nn.Module):
    """A forward that branches on its input's size (a common 'if x.shape[-1] > n' guard)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        if x.shape[-1] > 16:
            y = y * 2
        return self.c(torch.relu(y))


def test_a_branch_in_the_top_level_forward_is_named_without_an_impossible_exclude():
    net = octavize(_ShapeGuarded().eval(), 0.5, example_input=torch.randn(1, 3, 32, 32))
    assert net(torch.randn(1, 3, 24, 24)).shape == (1, 4, 24, 24)
    message = r"traced the model's forward for inputs where .* example_input like this one"
    with pytest.raises(RuntimeError, match=message) as caught:
        net(torch.randn(1, 3, 16, 16))
    assert "exclude=" not in str(caught.value)


class _ConcatNet(nn.Module):
    """Dense-style concatenation (the octave order of the concat's channels is not the vanilla order),
    GroupNorm after it and a transposed convolution: the modules load_vanilla must slice as octavize did."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.norm(self.a(self.stem(x))).relu()
        y = torch.cat([a, self.b(a)], 1)
        return self.head(self.up(self.bn(y).relu()))


def test_load_vanilla_into_a_converted_network_slices_weights_as_the_conversion_did():
    from oct3d.models import load_vanilla
    from oct3d.models.transfer import CHANNEL_ORDER_ATTR

    example = torch.randn(1, 3, 16, 16)
    torch.manual_seed(0)
    first, second = _ConcatNet().eval(), _ConcatNet().eval()
    with torch.no_grad():
        for module in second.modules():  # non-trivial statistics, so a mis-sliced BatchNorm shows
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    convert = lambda model: octavize(model, 0.5, example_input=example, vanilla_coarsest=False).eval()
    net = convert(first)
    # The conversion permuted the concatenation's channels: the modules after it say how.
    assert getattr(net.bn, CHANNEL_ORDER_ATTR, None) is not None and getattr(net.up, CHANNEL_ORDER_ATTR, None)
    reference = convert(copy.deepcopy(second))
    load_vanilla(net, second)
    with torch.no_grad():
        assert torch.allclose(net(example), reference(example), atol=1e-5)
    # The order survives copies (it lives on the modules, not on the GraphModule).
    copied = copy.deepcopy(net)
    load_vanilla(copied, first)
    with torch.no_grad():
        fresh = convert(copy.deepcopy(first))
        assert torch.allclose(copied(example), fresh(example), atol=1e-5)


def test_load_vanilla_takes_wrapped_prefixed_and_counterless_state_dicts():
    from oct3d.models import load_vanilla, oct_resnet26
    from oct3d.models.transfer import VanillaMismatchError

    vanilla = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [2, 2, 2, 2], num_classes=10)
    state = vanilla.state_dict()
    reference = load_vanilla(oct_resnet26(alpha=0.5, num_classes=10), vanilla).state_dict()
    for source in ({f"module.{k}": v for k, v in state.items()},           # DataParallel / DDP
                   {"state_dict": {f"model.{k}": v for k, v in state.items()}},  # a Lightning checkpoint
                   {k: v for k, v in state.items() if "num_batches_tracked" not in k}):  # an old checkpoint
        loaded = load_vanilla(oct_resnet26(alpha=0.5, num_classes=10), source).state_dict()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference if "num_batches_tracked" not in k)
    # A prefix that does not come off is named first, before the weights it leaves missing.
    prefixed = {**{f"net.{k}": v for k, v in state.items()}, "x": state["fc.bias"]}
    with pytest.raises(VanillaMismatchError, match=r"differ\.\n  - vanilla keys with no place .*net\.conv1"):
        load_vanilla(oct_resnet26(alpha=0.5, num_classes=10), prefixed)
    with pytest.raises(VanillaMismatchError, match=r"fc\.weight: expected shape .* exclude=\('fc',\)"):
        load_vanilla(oct_resnet26(alpha=0.5, num_classes=5), vanilla)

    class Wrapper(nn.Module):  # a network whose own top module is called "module": its prefix stays
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    wrapped = load_vanilla(Wrapper(oct_resnet26(alpha=0.5, num_classes=10)), Wrapper(vanilla).state_dict())
    assert torch.equal(wrapped.module.fc.weight, vanilla.fc.weight)


def test_frozen_batchnorm_backbones_convert_and_a_no_op_conversion_warns():
    """torchvision's detection backbones use FrozenBatchNorm2d; a network where nothing converts says so."""
    from torchvision.ops import FrozenBatchNorm2d

    from oct3d.models import load_vanilla

    torch.manual_seed(0)
    model = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d, num_classes=4).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    example = torch.randn(1, 3, 64, 64)
    net = octavize(model, 0.5, example_input=example)
    assert sum(a_out > 0 for _, a_out, _ in net.octave_plan.values()) >= 10
    with torch.no_grad():
        assert torch.allclose(octavize(model, 0.0, example_input=example)(example), model(example), atol=1e-4)
    load_vanilla(net, model.state_dict())  # the split frozen statistics load back too

    class LayerNormed(nn.Module):  # LayerNorm over channels (ConvNeXt-style) closes every octave
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.LayerNorm(8)
            self.out = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.out(self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    with pytest.warns(UserWarning, match=r"converted none of LayerNormed's 2 convolution"):
        octavize(LayerNormed(), 0.5, example_input=torch.randn(1, 3, 16, 16))


def test_train_eval_flags_of_the_model_and_its_submodules_are_kept():
    """A frozen (eval-mode) BatchNorm inside a training model stays frozen in the original and the result."""
    model = _plain_net().train()
    model[3].eval()
    converted = octavize(model, 0.5, example_input=torch.randn(1, 3, 16, 16))
    assert model.training and not model[3].training and model[0].training  # the input model untouched
    assert converted.training
    assert [m.training for m in converted.get_submodule("3").modules()] == [False, False, False]
    assert converted.get_submodule("0").training


class _NormalisedInput(nn.Module):
    """Input normalisation by a buffer before the first convolution (torchvision's transform_input)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.randn(1, 3, 1, 1))
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        first = torch.cat([x[:, :1] * 2.0, (x[:, 1:] - self.mean[:, 1:]) * 2.0], 1)
        return self.c2(self.c1(self.c0(first).relu()).relu())


def test_the_stem_is_the_first_convolution_after_any_input_preprocessing():
    converted = octavize(_NormalisedInput().eval(), 0.5, example_input=torch.randn(1, 3, 16, 16))
    assert converted.octave_plan["c0"] == (0.0, 0.0, "stem")
    assert converted.octave_plan["c1"][1] == 0.5
    # A learned layer before a convolution (here an excluded block holding the real stem) ends the input path.
    convs = {name: nn.Conv2d(8, 8, 3, padding=1) for name in ("c1", "c2", "c3")}
    model = nn.Sequential(OrderedDict(block=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), **convs)).eval()
    converted = octavize(model, 0.5, example_input=torch.randn(1, 3, 16, 16), exclude=("block",))
    assert converted.octave_plan["c1"][1] == 0.5


def test_an_input_the_model_rejects_is_blamed_not_the_module_with_control_flow():
    with pytest.raises(ConversionError, match=r"the model itself fails on example_input .*expected input\[1, 4"):
        octavize(_ShapeGuarded().eval(), 0.5, example_input=torch.randn(1, 4, 16, 16))


def test_monai_unetr_converts_with_its_einops_layers_as_closing_ops():
    """einops' Rearrange cannot be traced by torch.fx; the table keeps it whole, and UNETR's decoder converts."""
    pytest.importorskip("einops")
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    model = UNETR(1, 2, img_size=(16, 16, 16), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    net = octavize(model, 0.5, example_input=x)
    assert sum(a_out > 0 for _, a_out, _ in net.octave_plan.values()) >= 10
    assert net(x).shape == (1, 2, 16, 16, 16)
    torch.testing.assert_close(octavize(model, 0.0, example_input=x)(x), model(x), atol=1e-4, rtol=1e-4)


class _IntOfSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        n = int(x.shape[-1] // 2)
        return self.b(torch.nn.functional.interpolate(self.a(x), size=(n, n)))


class _BuildsInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return nn.AvgPool2d(2)(self.a(x))


def test_common_tracing_failures_say_what_they_mean():
    with pytest.raises(ConversionError, match=r"turns a traced size into a Python number"):
        octavize(_IntOfSize().eval(), 0.5, example_input=torch.randn(1, 3, 16, 16))
    with pytest.raises(ConversionError, match=r"module 'block' .*builds another module inside its forward"):
        octavize(nn.Sequential(OrderedDict(block=_BuildsInForward(), c=nn.Conv2d(8, 8, 3, padding=1))).eval(), 0.5,
                 example_input=torch.randn(1, 3, 16, 16))


def test_scalar_alpha_errors_name_the_argument_and_an_octave_model_is_recognised():
    with pytest.raises(ValueError, match=r"^alpha must be in \[0, 1\)"):
        octavize(_plain_net(), 1.0, example_input=torch.randn(1, 3, 16, 16))
    net = octavize(_plain_net(), torch.tensor(0.5), example_input=torch.randn(1, 3, 16, 16))
    assert any(a_out == 0.5 for _, a_out, _ in net.octave_plan.values())
    from oct3d.models import oct_resnet26

    with pytest.warns(UserWarning, match="already an octave network"):
        octavize(oct_resnet26(num_classes=4).eval(), 0.5, example_input=torch.randn(1, 3, 64, 64))


def test_an_example_input_that_shrinks_maps_to_one_pixel_warns():
    model = torchvision.models.resnet18(num_classes=4).eval()
    with pytest.warns(UserWarning, match=r"example_input \(1, 3, 16, 16\) shrinks the output of \d+ convolution"):
        octavize(model, 0.5, example_input=torch.randn(1, 3, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        octavize(model, 0.5, example_input=torch.randn(1, 3, 64, 64))


class _CroppingUNet(nn.Module):
    """A U-Net that crops its upsampled map to the skip's size (odd inputs), as many hand-written U-Nets do."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.down, self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.up, self.c3, self.head = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.c1(self.c0(x).relu()).relu()
        u = F.interpolate(self.up(self.c2(self.down(a).relu()).relu()), scale_factor=2.0)
        h, w = a.shape[-2:]
        return self.head(self.c3(torch.cat([u[..., :h, :w], a], 1)).relu())


@pytest.mark.parametrize("size", [(33, 31), (32, 32)])
def test_a_crop_of_spatial_axes_flows_through_both_branches(size):
    model = _CroppingUNet().eval()
    x = torch.randn(1, 3, *size)
    net = octavize(model, 0.5, example_input=x, vanilla_coarsest=False)
    assert net.octave_plan["up"] == (0.5, 0.5, "") and net.octave_plan["c3"] == (0.5, 0.5, "")
    other = torch.randn(1, 3, size[0] + 2, size[1] + 1)
    assert net(other).shape == model(other).shape
    torch.testing.assert_close(octavize(model, 0.0, example_input=x, vanilla_coarsest=False)(x), model(x),
                               atol=1e-5, rtol=1e-5)


def test_crop_low_keeps_the_branches_aligned_and_only_spatial_slices_match():
    from oct3d.convert.layers import crop_low, spatial_slices

    high, low = torch.randn(1, 2, 9, 10), torch.randn(1, 2, 5, 5)
    index = (Ellipsis, slice(1, 8), slice(2, None))
    cropped = crop_low(low, high, high[index], index, (2, 2))
    torch.testing.assert_close(cropped, low[:, :, 0:4, 1:5])  # starts halved, lengths the ceil of half
    assert spatial_slices((slice(None), slice(0, 4)), 4) is None  # channels
    assert spatial_slices((Ellipsis, slice(None, None, 2)), 4) is None  # a stride
    assert spatial_slices((Ellipsis, 0), 4) is None  # an integer drops an axis


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_convolutions_with_a_padding_mode_convert_and_keep_it(padding_mode):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, padding_mode=padding_mode), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, padding_mode=padding_mode), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, padding_mode=padding_mode), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, padding_mode=padding_mode), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, padding_mode=padding_mode), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 4, 1),
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    same = octavize(net, alpha=0.0, example_input=x)
    torch.testing.assert_close(same(x), net(x), atol=1e-5, rtol=1e-5)
    octave = octavize(net, alpha=0.5, example_input=x)
    convs = [m for m in octave.modules() if isinstance(m, OctConv) and not m.is_vanilla]
    assert len(convs) >= 2 and all(m.padding_mode == padding_mode for m in convs if m.kernel_size != (1, 1))
    assert octave(x).shape == net(x).shape


def test_a_pool_that_misaligns_the_octave_on_some_sizes_closes_it_so_every_size_runs():
    """MaxPool2d(3, 2, ceil_mode=True) (GoogLeNet, SqueezeNet) keeps the octave at the example size but not on
    sizes of 2 modulo 4; the converter checks every size and closes the octave before it."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, 2, ceil_mode=True), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 4, 1),
    ).eval()
    converted = octavize(net, alpha=0.5, example_input=torch.randn(1, 3, 32, 32)).eval()
    notes = describe_plan(converted)
    assert "ceil_mode cannot keep the low branch at half the high one on every input size" in notes
    assert any(isinstance(m, OctConv) and not m.is_vanilla for m in converted.modules())
    for size in (20, 22, 26, 27, 28, 30, 35, 36, 43, 44):  # 22, 26, 30: 2 modulo 4, where the pool misaligns
        assert converted(torch.randn(1, 3, size, size)).shape == net(torch.randn(1, 3, size, size)).shape
    same = octavize(net, alpha=0.0, example_input=torch.randn(1, 3, 32, 32)).eval()
    x = torch.randn(1, 3, 30, 30)
    torch.testing.assert_close(same(x), net(x), atol=1e-5, rtol=1e-5)


class _FunctionalDropoutNet(nn.Module):
    """DenseNet's idiom: F.dropout(..., training=self.training), and a literal training=True (MC dropout)."""

    def __init__(self, mc: bool = False) -> None:
        super().__init__()
        self.mc = mc
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.body(x)
        return self.head(F.dropout(x, p=0.5, training=True if self.mc else self.training))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_functional_dropout_follows_the_converted_networks_mode(mode):
    model = getattr(_FunctionalDropoutNet(), mode)()
    x = torch.randn(2, 3, 16, 16)
    net = octavize(model, alpha=0.5, example_input=x)
    net.train()
    torch.manual_seed(0)
    a = net(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, net(x))  # dropout applies in training
    net.eval()
    torch.testing.assert_close(net(x), net(x))
    # (random in both modes, so no output check can validate the conversion: validate=False)
    mc = octavize(_FunctionalDropoutNet(mc=True).eval(), alpha=0.5, example_input=x, validate=False).eval()
    torch.manual_seed(0)
    a = mc(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, mc(x))  # a literal training=True stays: dropout in eval mode too


def test_a_forward_that_branches_on_the_mode_is_named_and_dropped_parameters_are_counted():
    class DeepSupervision(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
            self.aux = nn.Conv2d(16, 2, 1)
            self.unused = nn.Linear(4, 4)
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            x = self.body(x)
            return (self.head(x), self.aux(x)) if self.training else self.head(x)

    with pytest.warns(UserWarning) as record:
        octavize(DeepSupervision().eval(), alpha=0.5, example_input=torch.randn(1, 3, 16, 16))
    messages = [str(w.message) for w in record]
    assert any("does other things in training than in eval mode" in m and "eval-mode code" in m for m in messages)
    assert any("54 parameter(s) of DeepSupervision belong to modules its forward never calls ('aux.weight'" in m
               for m in messages)


def test_torch_as_tensor_of_a_traced_map_is_the_map():
    """MONAI's HighResBlock wraps a module's output in torch.as_tensor."""

    class AsTensor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
            self.b = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.b(torch.as_tensor(self.a(x)))

    model = AsTensor().eval()
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(octavize(model, alpha=0.0, example_input=x)(x), model(x))
    assert torch.as_tensor([1.0]).tolist() == [1.0]  # restored after tracing


def test_tensor_constants_and_as_tensor_of_a_size_neither_warn_nor_stop_dropout_following_the_mode():
    class Constants(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                   nn.ReLU())
            self.b = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            y = F.dropout(self.a(x), 0.5, self.training)
            return self.b(y * torch.tensor(2.0)) + torch.as_tensor(y.shape[-1]).float()

    model = Constants().eval()
    x = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "does other things in training" warning from the traced constants
        net = octavize(model, alpha=0.5, example_input=x)
    assert any(isinstance(m, nn.Dropout) for m in net.modules())
    torch.testing.assert_close(octavize(model, alpha=0.0, example_input=x)(x), model(x))


def test_kept_convolutions_take_the_kernel_choice_in_inference_and_are_nn_conv_in_training(monkeypatch):
    torch.manual_seed(0)
    vanilla = torchvision.models.resnet18(num_classes=5)
    converted = octavize(vanilla, 0.5, example_input=torch.randn(1, 3, 64, 64))
    kept = {name: m for name, m in converted.named_modules() if isinstance(m, KernelConv2d)}
    assert "conv1" in kept and "layer4.1.conv1" in kept  # the stem and the coarsest level stay vanilla
    assert converted.state_dict().keys() == octavize(vanilla, 0.5, example_input=torch.randn(1, 3, 64, 64)
                                                     ).state_dict().keys()
    conv = kept["layer4.0.conv2"]
    x = torch.randn(2, conv.in_channels, 4, 4).contiguous(memory_format=torch.channels_last)
    routed = []
    real = kernels.conv_nd
    monkeypatch.setattr(kernels, "conv_nd", lambda *a, **k: routed.append(1) or real(*a, **k))
    conv.train()
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, None, conv.stride, conv.padding)) and routed == []
    conv.eval()
    seen = []
    conv.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        out = conv(x)
    assert routed == [1] and seen == [1] and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, F.conv2d(x, conv.weight, None, conv.stride, conv.padding), atol=1e-5, rtol=1e-5)
    # A kept convolution is a stock one to the converter: converted again, it becomes octave.
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), kernel_conv(nn.Conv2d(16, 16, 3, padding=1)),
                        nn.Conv2d(16, 8, 3, padding=1))
    again = octavize(net, 0.5, example_input=torch.randn(1, 3, 16, 16), vanilla_coarsest=False)
    assert isinstance(again.get_submodule("1"), OctConv)


def test_kernel_conv_keeps_what_it_cannot_route():
    conv3d = nn.Conv3d(4, 4, 3, padding=1)
    assert type(kernel_conv(conv3d)) is KernelConv3d and kernel_conv(conv3d).weight is conv3d.weight
    hooked = nn.Conv2d(4, 4, 3, padding=1)
    hooked.register_forward_pre_hook(lambda *a: None)
    pruned = nn.Conv2d(4, 4, 3, padding=1)
    torch.nn.utils.parametrizations.weight_norm(pruned)

    class MyConv(nn.Conv2d):
        pass

    for module in (nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                   hooked, pruned, MyConv(4, 4, 3), nn.Conv1d(4, 4, 3)):
        assert kernel_conv(module) is None
