"""Weights into the video models: load_vanilla from pytorchvideo/torchvision, and 2D -> 3D inflation."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck as Bottleneck2d
from torchvision.models.resnet import ResNet
from torchvision.models.video import r3d_18
from torchvision.models.video.resnet import BasicBlock, BasicStem, Bottleneck, Conv3DSimple, VideoResNet

from oct3d.models import (
    VanillaMismatchError,
    inflate,
    load_vanilla,
    oct_c2d_r50,
    oct_i3d_r50,
    oct_r3d_18,
    oct_r3d_34,
    oct_r3d_50,
    oct_slow_r50,
)
from oct3d.models.resnet import OctResNet, oct_resnet50
from oct3d.nn import Octave, OctBatchNorm, OctConv

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pytorchvideo imports emit deprecation warnings
    from pytorchvideo.models.resnet import create_resnet

# pytorchvideo's hub configurations (pytorchvideo.models.hub.resnet), at a small stem width.
PTV_CONFIGS = {
    "i3d": dict(
        stem_conv_kernel_size=(5, 7, 7), stage1_pool=nn.MaxPool3d,
        stage_conv_a_kernel_size=((3, 1, 1), [(3, 1, 1), (1, 1, 1)], [(3, 1, 1), (1, 1, 1)], [(1, 1, 1), (3, 1, 1)]),
    ),
    "c2d": dict(stem_conv_kernel_size=(1, 7, 7), stage1_pool=nn.MaxPool3d, stage_conv_a_kernel_size=((1, 1, 1),) * 4),
    "slow": dict(stem_conv_kernel_size=(1, 7, 7)),
}


def _randomize_batchnorm(model: nn.Module) -> None:
    # Random statistics and affine parameters, so that a wrongly split BatchNorm shows.
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for tensor, low, high in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 1.5),
                                      (m.weight.data, 0.5, 1.5), (m.bias.data, -0.5, 0.5)):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)


def _ptv(name: str, frames_at_head: int) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A 4 x 32 x 32 clip ends as frames_at_head x 1 x 1; the head pool must cover exactly that.
        model = create_resnet(
            **PTV_CONFIGS[name], stem_dim_out=16, model_num_class=5, head_pool_kernel_size=(frames_at_head, 1, 1)
        )
    _randomize_batchnorm(model)
    return model.eval()


@pytest.mark.parametrize(
    ("builder", "name", "frames_at_head"),
    [(oct_i3d_r50, "i3d", 2), (oct_c2d_r50, "c2d", 2), (oct_slow_r50, "slow", 4)],
    ids=["i3d_r50", "c2d_r50", "slow_r50"],
)
def test_load_vanilla_pytorchvideo_alpha0_identical(builder, name, frames_at_head):
    vanilla = _ptv(name, frames_at_head)
    model = load_vanilla(builder(alpha=0.0, base_width=16, num_classes=5), vanilla).eval()
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(clip), vanilla(clip), rtol=1e-5, atol=1e-5)


def test_load_vanilla_pytorchvideo_state_dict_and_warm_start():
    vanilla = _ptv("i3d", 2)
    model = oct_i3d_r50(alpha=0.5, octave="spatiotemporal", base_width=16, num_classes=5)
    load_vanilla(model, vanilla.state_dict())
    # The stem and res5 are vanilla in both models: copied verbatim.
    torch.testing.assert_close(model.conv1.weight, vanilla.blocks[0].conv.weight)
    torch.testing.assert_close(model.layer4[0].conv2.h2h.weight, vanilla.blocks[5].res_blocks[0].branch2.conv_b.weight)
    # An octave layer holds the channel partition of the vanilla kernel.
    full = vanilla.blocks[4].res_blocks[0].branch2.conv_b.weight
    conv = model.layer3[0].conv2
    torch.testing.assert_close(conv.l2h.weight, full[: conv.out_high, conv.in_high:])
    torch.testing.assert_close(model.fc.weight, vanilla.blocks[6].proj.weight)


def test_load_vanilla_rejects_other_architecture():
    with pytest.raises(VanillaMismatchError, match="architectures differ"):
        load_vanilla(oct_c2d_r50(alpha=0.0, base_width=16, num_classes=5), _ptv("i3d", 2))


def _tv_video_resnet(block, depths, num_classes=5) -> nn.Module:
    torch.manual_seed(0)
    model = VideoResNet(block, [Conv3DSimple] * 4, depths, BasicStem, num_classes=num_classes)
    _randomize_batchnorm(model)
    return model.eval()


@pytest.mark.parametrize(
    ("builder", "vanilla"),
    [
        (oct_r3d_18, lambda: _tv_video_resnet(BasicBlock, [2, 2, 2, 2])),
        (oct_r3d_34, lambda: _tv_video_resnet(BasicBlock, [1, 1, 1, 1])),
        (oct_r3d_50, lambda: _tv_video_resnet(Bottleneck, [1, 1, 1, 1])),
    ],
    ids=["r3d_18", "r3d_34_shallow", "r3d_50_shallow"],
)
def test_load_vanilla_torchvision_alpha0_identical(builder, vanilla):
    vanilla = vanilla()
    depths = (2, 2, 2, 2) if builder is oct_r3d_18 else (1, 1, 1, 1)
    model = load_vanilla(builder(alpha=0.0, depths=depths, num_classes=5), vanilla).eval()
    clip = torch.randn(1, 3, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(clip), vanilla(clip), rtol=1e-5, atol=1e-5)


def test_load_vanilla_torchvision_r3d_18_builder_at_alpha():
    torch.manual_seed(0)
    vanilla = r3d_18(num_classes=7)  # random init, never pretrained
    model = load_vanilla(oct_r3d_18(alpha=0.25, num_classes=7), vanilla)
    # layer1.0 changes only the ratio (0 -> .25): its shortcut is a parameter-free re-split, as the
    # vanilla block's is the identity, so every vanilla weight has exactly one place.
    torch.testing.assert_close(model.layer1[0].conv1.h2h.weight, vanilla.layer1[0].conv1[0].weight[:48])
    torch.testing.assert_close(model.layer1[0].conv1.h2l.weight, vanilla.layer1[0].conv1[0].weight[48:])


# --------------------------------------------------------------------------- inflation


def _features_2d(model: nn.Module, frame: torch.Tensor):
    x = model.maxpool(model.relu(model.bn1(model.conv1(frame))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def _resnet_2d(alpha: float, depths=(1, 1, 1, 1), num_classes=5) -> nn.Module:
    torch.manual_seed(0)
    if alpha == 0:
        model = ResNet(Bottleneck2d, list(depths), num_classes=num_classes)
    else:
        model = OctResNet(depths, alpha=alpha, num_classes=num_classes)
    _randomize_batchnorm(model)
    nn.init.normal_(model.fc.weight, 0.0, 0.1)
    return model.eval()


def _clip_of(frame: torch.Tensor, frames: int) -> torch.Tensor:
    return frame.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()


@pytest.mark.parametrize(("alpha", "octave"), [(0.0, "spatial"), (0.5, "spatial"), (0.5, "spatiotemporal")])
def test_inflated_c2d_on_identical_frames_gives_2d_output(alpha, octave):
    model_2d = _resnet_2d(alpha)
    video = oct_c2d_r50(alpha=alpha, octave=octave, depths=(1, 1, 1, 1), num_classes=5).eval()
    report = inflate(video, model_2d)
    assert report.classifier_copied and not report.warm_start and not report.left_untouched
    frame = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(video(_clip_of(frame, 3)), model_2d(frame), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_inflated_i3d_on_identical_frames_gives_2d_output_away_from_borders(alpha):
    # I3D's temporal kernels are zero-padded, so the frames within the receptive field of a clip
    # border see fewer than kt taps; with one block per stage, frames 5..10 of layer4's 16 do not.
    model_2d = _resnet_2d(alpha)
    video = oct_i3d_r50(alpha=alpha, depths=(1, 1, 1, 1), num_classes=5).eval()
    inflate(video, model_2d)
    frame = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        features = video.forward_features(_clip_of(frame, 32))
        expected = _features_2d(model_2d, frame)
        centre = features[:, :, 5:11]
        for t in range(centre.shape[2]):
            torch.testing.assert_close(centre[:, :, t], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(video.fc(video.avgpool(centre)), model_2d(frame), rtol=1e-4, atol=1e-5)
        # At the border the zero padding shows: this is what the comparison above is able to catch.
        assert (features[:, :, 0] - expected).abs().max() > 1e-3


def test_inflate_from_oct_resnet50_full_depth():
    torch.manual_seed(0)
    model_2d = oct_resnet50(alpha=0.5, num_classes=6)
    _randomize_batchnorm(model_2d)
    model_2d.eval()
    video = oct_c2d_r50(alpha=0.5, num_classes=6).eval()
    report = inflate(video, model_2d)
    assert report.classifier_copied and not report.warm_start
    layers = {n for n, m in video.named_modules() if isinstance(m, (OctConv, OctBatchNorm, nn.Linear))}
    assert set(report.inflated) == layers | {"conv1", "bn1"}
    frame = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(video(_clip_of(frame, 2)), model_2d(frame), rtol=1e-4, atol=1e-5)
    # path by path: l2h of a 1x3x3 conv is the 2D l2h kernel with a unit temporal axis
    torch.testing.assert_close(video.layer2[1].conv2.l2h.weight[:, :, 0], model_2d.layer2[1].conv2.l2h.weight)


def test_inflate_kernel_is_mean_over_time():
    model_2d = _resnet_2d(0.5)
    video = oct_i3d_r50(alpha=0.5, depths=(1, 1, 1, 1), num_classes=5)
    inflate(video, model_2d)
    inflated = video.layer1[0].conv1.h2l.weight  # kernel 3x1x1
    assert inflated.shape[2] == 3
    for t in range(3):
        torch.testing.assert_close(inflated[:, :, t] * 3, model_2d.layer1[0].conv1.h2l.weight)
    stem = video.conv1.weight  # 5x7x7
    torch.testing.assert_close(stem.sum(dim=2), model_2d.conv1.weight)


def test_inflate_vanilla_into_octave_is_a_reported_warm_start():
    model_2d = _resnet_2d(0.0)
    video = oct_c2d_r50(alpha=0.5, depths=(1, 1, 1, 1), num_classes=5)
    report = inflate(video, model_2d)
    assert "layer1.0.conv2" in report.warm_start and "layer1.0.bn2" in report.warm_start
    assert "conv1" not in report.warm_start and "layer4.0.conv2" not in report.warm_start
    full = model_2d.layer2[0].conv2.weight
    conv = video.layer2[0].conv2
    torch.testing.assert_close(conv.h2l.weight[:, :, 0], full[conv.out_high:, : conv.in_high])


def test_inflate_leaves_classifier_with_other_class_count():
    model_2d = _resnet_2d(0.0, num_classes=5)
    video = oct_c2d_r50(alpha=0.0, depths=(1, 1, 1, 1), num_classes=7)
    before = video.fc.weight.detach().clone()
    with pytest.warns(UserWarning, match="class counts differ"):
        report = inflate(video, model_2d)
    assert not report.classifier_copied and report.left_untouched == ["fc"]
    torch.testing.assert_close(video.fc.weight, before)
    torch.testing.assert_close(video.layer1[0].conv1.h2h.weight[:, :, 0], model_2d.layer1[0].conv1.weight)


@pytest.mark.parametrize(
    ("model_2d", "video", "match"),
    [
        (lambda: _resnet_2d(0.0), lambda: oct_c2d_r50(alpha=0.0, depths=(2, 1, 1, 1), num_classes=5),
         "layer1.1.conv1: no layer of this name"),
        (lambda: _resnet_2d(0.0, depths=(2, 1, 1, 1)), lambda: oct_c2d_r50(alpha=0.0, depths=(1, 1, 1, 1)),
         "no counterpart in the video model"),
        (lambda: _resnet_2d(0.25), lambda: oct_c2d_r50(alpha=0.5, depths=(1, 1, 1, 1), num_classes=5),
         "same alpha"),
        (lambda: _resnet_2d(0.0), lambda: oct_r3d_18(alpha=0.0, depths=(1, 1, 1, 1), num_classes=5),
         "cannot inflate"),
        (lambda: _resnet_2d(0.0), lambda: oct_c2d_r50(alpha=0.0, base_width=32, depths=(1, 1, 1, 1)),
         "cannot inflate"),
    ],
    ids=["video_deeper", "2d_deeper", "alpha_mismatch", "basic_vs_bottleneck", "width"],
)
def test_inflate_rejects_other_architectures(model_2d, video, match):
    target = video()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(VanillaMismatchError, match=match):
        inflate(target, model_2d())
    # The layers matched before the mismatch was found are put back: nothing changed.
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_inflate_argument_types():
    with pytest.raises(TypeError, match="model_2d"):
        inflate(oct_c2d_r50(depths=(1, 1, 1, 1), base_width=8), {"conv1.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="3D"):
        inflate(_resnet_2d(0.5), _resnet_2d(0.5))


def test_octave_output_of_inflated_layer_has_expected_branches():
    video = oct_c2d_r50(alpha=0.5, depths=(1, 1, 1, 1))
    inflate(video, _resnet_2d(0.5, num_classes=400))
    out = video.layer1(torch.randn(1, 64, 2, 8, 8))
    assert isinstance(out, Octave) and out.low.shape == (1, 128, 2, 4, 4)
