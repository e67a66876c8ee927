"""d-li14/octconv.pytorch checkpoints into oct3d's OctResNet, against an independent port of their modules.

``_Their*`` below re-implements d-li14/octconv.pytorch's ``octconv.py`` / ``oct_resnet.py``
(commit d639428) for groups = 1: the same module names (so the same state-dict keys), channel
counts (``int(alpha * c)`` low channels) and forward rules (``nn.AvgPool2d(2, 2)`` before every
strided convolution and for H->L, nearest ``scale_factor=2`` upsampling for L->H at stride 1, no
upsampling at stride 2, the hard-coded alpha .5 of their bottleneck's conv2/conv3, ``layer4``
built with ``alpha_out=0, output=True``). No download: the weights are random.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oct3d.interop import (
    OctconvPytorchMismatchError,
    from_octconv_pytorch,
    load_octconv_pytorch,
    translate_octconv_pytorch,
)
from oct3d.models import oct_mobilenet_v1, oct_resnet26, oct_resnet50, oct_resnet101


class _TheirOctaveConv(nn.Module):
    def __init__(self, cin, cout, kernel, alpha_in, alpha_out, stride=1, padding=0, groups=1):
        super().__init__()
        self.stride = stride
        depthwise = groups == cin
        low_in, low_out = int(alpha_in * cin), int(alpha_out * cout)

        def conv(i, o, g):
            return nn.Conv2d(i, o, kernel, 1, padding, groups=g, bias=False)

        self.conv_l2l = conv(low_in, low_out, math.ceil(alpha_in * groups)) if low_in and low_out else None
        self.conv_l2h = conv(low_in, cout - low_out, groups) if low_in and not depthwise else None
        self.conv_h2l = conv(cin - low_in, low_out, groups) if low_out and not depthwise else None
        self.conv_h2h = conv(cin - low_in, cout - low_out, math.ceil(groups - alpha_in * groups))

    def forward(self, x):
        high, low = x if isinstance(x, tuple) else (x, None)
        if self.stride == 2:
            high = F.avg_pool2d(high, 2, 2)
        y_high = self.conv_h2h(high)
        y_low = self.conv_h2l(F.avg_pool2d(high, 2, 2)) if self.conv_h2l is not None else None
        if low is not None:
            if self.conv_l2h is not None:
                from_low = self.conv_l2h(low)
                if self.stride == 1:
                    from_low = F.interpolate(from_low, scale_factor=2, mode="nearest")
                y_high = y_high + from_low
            if self.conv_l2l is not None:
                from_low = self.conv_l2l(F.avg_pool2d(low, 2, 2) if self.stride == 2 else low)
                y_low = from_low if y_low is None else y_low + from_low
        return y_high, y_low


class _TheirConvBN(nn.Module):  # their Conv_BN (act=False) and Conv_BN_ACT (act=True)
    def __init__(self, cin, cout, kernel, alpha_in, alpha_out, stride=1, padding=0, groups=1, act=True):
        super().__init__()
        self.conv = _TheirOctaveConv(cin, cout, kernel, alpha_in, alpha_out, stride, padding, groups)
        self.bn_h = nn.BatchNorm2d(int(cout * (1 - alpha_out)))
        self.bn_l = nn.BatchNorm2d(int(cout * alpha_out)) if alpha_out else None
        self.act = nn.ReLU(inplace=True) if act else None

    def forward(self, x):
        high, low = self.conv(x)
        high = self.bn_h(high)
        low = self.bn_l(low) if low is not None else None
        if self.act is not None:
            high, low = self.act(high), (self.act(low) if low is not None else None)
        return high, low


class _TheirBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None, alpha_in=0.5, alpha_out=0.5, output=False):
        super().__init__()
        inner = 0 if output else 0.5
        self.conv1 = _TheirConvBN(inplanes, planes, 1, alpha_in, alpha_out)
        self.conv2 = _TheirConvBN(planes, planes, 3, inner, inner, stride, 1)
        self.conv3 = _TheirConvBN(planes, planes * 4, 1, inner, inner, act=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        id_high, id_low = x if isinstance(x, tuple) else (x, None)
        high, low = self.conv3(self.conv2(self.conv1(x)))
        if self.downsample is not None:
            id_high, id_low = self.downsample(x)
        high = self.relu(high + id_high)
        low = self.relu(low + id_low) if id_low is not None else None
        return high, low


class _TheirOctResNet(nn.Module):
    def __init__(self, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, layers[0], alpha_in=0)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2, alpha_out=0, output=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def _make_layer(self, planes, blocks, stride=1, alpha_in=0.5, alpha_out=0.5, output=False):
        downsample = nn.Sequential(
            _TheirConvBN(self.inplanes, planes * 4, 1, alpha_in, alpha_out, stride, act=False)
        )
        layers = [_TheirBottleneck(self.inplanes, planes, stride, downsample, alpha_in, alpha_out, output)]
        self.inplanes = planes * 4
        ratio = 0 if output else 0.5
        layers += [_TheirBottleneck(self.inplanes, planes, 1, None, ratio, ratio, output) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        high, _ = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(high), 1))


class _TheirOctMobileNet(nn.Module):  # their oct_mobilenet.py (MobileNetV1, width 1.0)
    def __init__(self, num_classes=1000):
        super().__init__()

        def separable(cin, cout, stride, alpha_in=0.5, alpha_out=0.5):
            return nn.Sequential(
                _TheirConvBN(cin, cin, 3, alpha_in, alpha_in, stride, 1, groups=cin),
                _TheirConvBN(cin, cout, 1, alpha_in, alpha_out),
            )

        stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.features = nn.Sequential(
            stem, separable(32, 64, 1, 0, 0.5), separable(64, 128, 2), separable(128, 128, 1),
            separable(128, 256, 2), separable(256, 256, 1), separable(256, 512, 2),
            *[separable(512, 512, 1) for _ in range(4)], separable(512, 512, 1, 0.5, 0),
            separable(512, 1024, 2, 0, 0), separable(1024, 1024, 1, 0, 0),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        high, _ = self.features(x)
        return self.fc(torch.flatten(self.avgpool(high), 1))


def _theirs(layers, num_classes=1000) -> nn.Module:
    torch.manual_seed(0)
    model = _TheirOctMobileNet(num_classes) if layers == "mobilenet" else _TheirOctResNet(layers, num_classes)
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():  # random statistics and affine parameters, so a misplaced norm shows
        if isinstance(m, nn.BatchNorm2d):
            for tensor, low, high in ((m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 1.5),
                                      (m.weight.data, 0.5, 1.5), (m.bias.data, -0.2, 0.2)):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")  # keeps logits O(1)
    return model.eval()


def _assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Random deep nets have logits of any scale: compare relative to it (float32 summation order differs).
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


# Keys and shapes read off d-li14's code for Oct-ResNet-50 (pinning the port above to it).
PUBLISHED = {
    "layer1.0.conv1.conv.conv_h2h.weight": (32, 64, 1, 1),
    "layer1.0.conv1.conv.conv_h2l.weight": (32, 64, 1, 1),
    "layer1.0.conv1.bn_l.running_var": (32,),
    "layer1.0.downsample.0.conv.conv_h2l.weight": (128, 64, 1, 1),
    "layer3.5.conv2.conv.conv_l2l.weight": (128, 128, 3, 3),
    "layer2.0.conv2.conv.conv_l2h.weight": (64, 64, 3, 3),
    "layer4.0.conv1.conv.conv_l2h.weight": (512, 512, 1, 1),
    "layer4.0.conv2.conv.conv_h2h.weight": (512, 512, 3, 3),
    "layer4.0.conv3.bn_h.weight": (2048,),
    "layer4.0.downsample.0.conv.conv_l2h.weight": (2048, 512, 1, 1),
    "layer4.2.conv1.conv.conv_h2h.weight": (512, 2048, 1, 1),
    "fc.weight": (1000, 2048),
}
PUBLISHED_MOBILENET = {
    "features.0.0.weight": (32, 3, 3, 3),
    "features.1.0.conv.conv_h2h.weight": (32, 1, 3, 3),
    "features.1.1.conv.conv_h2l.weight": (32, 32, 1, 1),
    "features.2.0.conv.conv_l2l.weight": (32, 1, 3, 3),
    "features.2.0.bn_l.running_mean": (32,),
    "features.11.1.conv.conv_l2h.weight": (512, 256, 1, 1),
    "features.12.0.conv.conv_h2h.weight": (512, 1, 3, 3),
    "fc.weight": (1000, 1024),
}


@pytest.mark.parametrize(
    ("layers", "builder", "published"),
    [((3, 4, 6, 3), oct_resnet50, PUBLISHED), ((3, 4, 23, 3), oct_resnet101, PUBLISHED),
     ("mobilenet", oct_mobilenet_v1, PUBLISHED_MOBILENET)],
    ids=["resnet50", "resnet101", "mobilenet_v1"],
)
def test_every_key_maps_onto_oct3d(layers, builder, published):
    with torch.device("meta"):
        state = (_TheirOctMobileNet() if layers == "mobilenet" else _TheirOctResNet(layers)).state_dict()
        model = builder(alpha=0.5)
    for key, shape in published.items():
        assert tuple(state[key].shape) == shape, key
    # No low outputs where the paper is vanilla: ResNet's layer4, MobileNet's last two blocks.
    assert not any(re.match(r"(layer4|features\.1[23])\..*(h2l|l2l|bn_l)", k) for k in state)
    mapped = translate_octconv_pytorch(state, model)  # raises on any unconsumed key or unfilled parameter
    ours = model.state_dict()
    assert len(state) == len(mapped) == len(ours) and set(mapped) == set(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)


def test_resnet50_logits_match_their_forward():
    theirs = _theirs((3, 4, 6, 3))
    model = from_octconv_pytorch(theirs.state_dict(), arch="oct_resnet50").eval()
    image = torch.randn(2, 3, 96, 96)  # low maps of 3x3 in layer3, like 7x7 at 224
    with torch.no_grad():
        _assert_same_logits(model(image), theirs(image))


def test_mobilenet_v1_logits_match_their_forward():
    theirs = _theirs("mobilenet")
    model = from_octconv_pytorch(theirs.state_dict(), arch="oct_mobilenet").eval()
    assert model.pool_first and model.pw_alphas[0] == 0.5
    image = torch.randn(2, 3, 64, 64)  # 4x4 high / 2x2 low maps at the end of the octave part
    with torch.no_grad():
        _assert_same_logits(model(image), theirs(image))


def test_checkpoint_file_with_dataparallel_prefix(tmp_path):
    theirs = _theirs((2, 2, 2, 2), num_classes=10)
    # The format of their training script: DataParallel keys inside a training checkpoint.
    checkpoint = {
        "epoch": 120, "arch": "oct_resnet26", "best_acc1": torch.tensor(70.0),
        "state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()},
    }
    path = tmp_path / "model_best.pth.tar"
    torch.save(checkpoint, path)
    model = from_octconv_pytorch(path).eval()  # architecture, alpha and classes read from the keys
    assert model.layers == (2, 2, 2, 2) and model.fc.out_features == 10
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(image)
        _assert_same_logits(model(image), expected)
        # Their strided ratio-0 conv (layer4.0.conv2) pools first: a strided conv gives other logits.
        strided = oct_resnet26(alpha=0.5, num_classes=10, pool_first=False).eval()
        strided.load_state_dict(model.state_dict())
        assert (strided(image) - expected).norm() > 0.01 * expected.norm()
    again = load_octconv_pytorch(oct_resnet26(alpha=0.5, num_classes=10), str(path))
    torch.testing.assert_close(again.layer2[1].conv2.l2h.weight, theirs.layer2[1].conv2.conv.conv_l2h.weight)


def test_mismatches_are_named():
    with torch.device("meta"):
        state = _TheirOctResNet((3, 4, 6, 3)).state_dict()
        with pytest.raises(OctconvPytorchMismatchError, match=r"alphas \[0.5, 0.5, 0.5, 0.0\].*alphas \[0.25"):
            translate_octconv_pytorch(state, oct_resnet50(alpha=0.25))
        with pytest.raises(OctconvPytorchMismatchError, match="pool_first"):
            translate_octconv_pytorch(state, oct_resnet50(alpha=0.5, pool_first=False))
        with pytest.raises(OctconvPytorchMismatchError, match=r"stage \[3, 4, 6, 3\].*stage \[3, 4, 23, 3\]"):
            translate_octconv_pytorch(state, oct_resnet101(alpha=0.5))
        broken = dict(state)
        del broken["layer2.1.conv2.conv.conv_l2h.weight"]
        broken["layer2.1.conv2.extra.weight"] = state["fc.bias"]
        broken["layer3.0.conv1.bn_l.bias"] = state["fc.bias"]
        with pytest.raises(OctconvPytorchMismatchError) as err:
            translate_octconv_pytorch(broken, oct_resnet50(alpha=0.5))
    message = str(err.value)
    assert "layer2.1.conv2.l2h.weight" in message  # unfilled, in our names
    assert "layer2.1.conv2.extra.weight" in message  # no place, in theirs
    assert "layer3.0.bn1.bn_l.bias: checkpoint (1000,), model (128,)" in message
    with pytest.raises(OctconvPytorchMismatchError, match="arch='oct_resnet101'"):
        from_octconv_pytorch(state, arch="oct_resnet101")
    with pytest.raises(TypeError, match="state dict"):
        from_octconv_pytorch({"epoch": 3})
