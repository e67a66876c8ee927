"""oct3d.fuse: BatchNorm folding keeps outputs equal and removes every foldable BatchNorm."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import oct3d
from oct3d.fuse import find_conv_bn_pairs
from oct3d.models import get_model, list_models
from oct3d.models.blocks import OctBasicBlock, OctBottleneck, make_stage
from oct3d.nn import Octave, OctBatchNorm, OctConv, OctGlobalAvgPool


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so folding actually changes weights."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return model


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, OctBatchNorm)) for m in model.modules()
               if not any(m is c for p in model.modules() if isinstance(p, OctBatchNorm) for c in p.children()))


class TinyOctResNet(nn.Module):
    """A small ResNet laid out like the paper's (vanilla stem, octave middle, vanilla last stage)."""

    def __init__(self, dims: int, alpha: float, block=OctBottleneck, octave: str = "spatial") -> None:
        super().__init__()
        conv, bn = {2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
        self.conv1 = conv(3, 8, 3, padding=1, bias=False)
        self.bn1 = bn(8)
        self.relu = nn.ReLU(inplace=True)
        widths = {OctBottleneck: (8, 16), OctBasicBlock: (16, 16)}[block]
        self.layer1 = make_stage(block, dims, 8, widths[0], widths[1], 2, 1, 0.0, alpha, octave=octave)
        self.layer2 = make_stage(block, dims, widths[1], widths[0], widths[1], 2, 2, alpha, alpha, octave=octave)
        self.layer3 = make_stage(block, dims, widths[1], widths[0], widths[1], 1, 2, alpha, 0.0, octave=octave)
        self.pool = OctGlobalAvgPool()
        self.fc = nn.Linear(widths[1], 5)

    def forward(self, x):
        return self.fc(self.pool(self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))))


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize(("dims", "octave", "size"), [
    (2, "spatial", (1, 3, 19, 17)),
    (3, "spatial", (1, 3, 4, 12, 10)),
    (3, "spatiotemporal", (1, 3, 5, 11, 12)),
])
@pytest.mark.parametrize("block", [OctBottleneck, OctBasicBlock])
def test_fuse_resnet_style_equal(alpha, dims, octave, size, block):
    torch.manual_seed(0)
    model = _randomize_bn(TinyOctResNet(dims, alpha, block, octave)).eval()
    x = torch.randn(size)
    fused = oct3d.fuse(model, example_input=size)
    assert fused is not model and not fused.training
    assert _bn_count(fused) == 0 and _bn_count(model) > 0  # all folded, the original untouched
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)


def test_fuse_octconv_paths_get_the_right_branch():
    """High BN scales h2h and l2h (bias on h2h); low BN scales h2l and l2l (bias on l2l)."""
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(OctConv(2, 8, 8, 3, 0.5, 0.5), OctBatchNorm(2, 8, 0.5))).eval()
    x = Octave(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4))
    fused = oct3d.fuse(model, example_input=x, inplace=False)
    conv = fused[0]
    assert isinstance(fused[1], nn.Identity)
    assert conv.h2h.bias is not None and conv.l2l.bias is not None
    assert conv.l2h.bias is None and conv.h2l.bias is None
    scale_h = model[1].bn_h.weight / torch.sqrt(model[1].bn_h.running_var + model[1].bn_h.eps)
    torch.testing.assert_close(conv.l2h.weight, model[0].l2h.weight * scale_h.view(-1, 1, 1, 1))
    with torch.no_grad():
        for a, b in zip(fused(x), model(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fuse_first_layer_puts_low_bias_on_h2l_and_keeps_existing_bias():
    torch.manual_seed(0)
    first = OctConv(2, 3, 8, 3, 0.0, 0.5, bias=True)
    model = _randomize_bn(nn.Sequential(first, OctBatchNorm(2, 8, 0.5))).eval()
    x = torch.randn(2, 3, 9, 9)
    fused = oct3d.fuse(model, example_input=x)
    assert fused[0].h2l.bias is not None
    with torch.no_grad():
        for a, b in zip(fused(x), model(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fuse_skips_pre_activation_batchnorm():
    """DenseNet-style norm -> relu -> conv: the BN reads no conv output and must stay."""
    model = _randomize_bn(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1)
    )).eval()
    assert find_conv_bn_pairs(model, (1, 3, 8, 8)) == [("0", "1")]
    x = torch.randn(1, 3, 8, 8)
    fused = oct3d.fuse(model, x)
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[3], nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_fuse_inplace_and_errors():
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert oct3d.fuse(model, inplace=True) is model
    assert isinstance(model[1], nn.Identity)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        oct3d.fuse("resnet")
    with pytest.raises(ValueError, match="example_input"):
        oct3d.fuse(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), example_input=(1, 5, 8, 8))


def test_fuse_torchvision_mobilenet_and_resnet():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    for model in (torchvision.models.mobilenet_v2(num_classes=10), torchvision.models.resnet18(num_classes=10)):
        model = _randomize_bn(model).eval()
        fused = oct3d.fuse(model, x)
        assert _bn_count(fused) == 0
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), atol=1e-3, rtol=1e-3)


REAL = [name for name in ("oct_resnet50", "oct_resnext50_32x4d", "oct_mobilenet_v2", "oct_i3d_r50", "oct_r3d_18")
        if name in list_models()]


@pytest.mark.parametrize("name", REAL)
def test_fuse_real_builders(name):
    torch.manual_seed(0)
    video = name.startswith(("oct_i3d", "oct_r3d"))
    kwargs = {"alpha": 0.5, "num_classes": 10}
    if video:
        kwargs.update(depths=(1, 1, 1, 1), base_width=8, octave="spatiotemporal")
        size = (1, 3, 8, 32, 32)
    else:
        size = (1, 3, 64, 64)
    model = _randomize_bn(get_model(name, **kwargs)).eval()
    x = torch.randn(size)
    fused = oct3d.fuse(model, x)
    assert _bn_count(fused) == 0
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-3, rtol=1e-3)


def test_a_reduced_precision_model_fuses_and_is_costed():
    """The meta run and the cost functions give inputs the model's dtype (octave layers check it)."""
    from oct3d.profiling import count_macs

    model = get_model("oct_resnet26", num_classes=5).eval().to(torch.bfloat16)
    fused = oct3d.fuse(model, example_input=(1, 3, 64, 64))
    assert sum(isinstance(m, nn.Identity) for m in fused.modules()) == len(find_conv_bn_pairs(model))
    assert oct3d.fuse(model, example_input=torch.randn(1, 3, 64, 64)) is not None  # a float32 example too
    assert count_macs(model, (1, 3, 64, 64)) == count_macs(model.float(), (1, 3, 64, 64))

