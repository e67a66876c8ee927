"""Weights from torchvision models into the 2D octave backbones (``load_vanilla``).

At alpha 0 the octave model must compute exactly what the vanilla model computes. At alpha > 0
the loaded model is a warm start for fine-tuning, not an equivalent network: besides the low
channels seeing pooled maps, every strided octave convolution average-pools before convolving
instead of subsampling, which changes the high path too. Measured on randomly initialised
torchvision models (BatchNorm statistics calibrated on smooth random images, 32 images of
112x112, low-pass noise), relative L2 distance of the logits / mean cosine similarity:

    resnet50        alpha .125 / .25 / .5: 0.58 / 0.57 / 0.56,  cos 0.83 / 0.84 / 0.85
    resnext50_32x4d alpha .25 / .5:        0.62 / 0.62,         cos 0.80 / 0.79
    mobilenet_v2    alpha .125 / .25 / .5: 0.68 / 0.69 / 0.70,  cos 0.75 / 0.74 / 0.73
    densenet121     alpha .125 / .25 / .5: 0.88 / 1.07 / 1.48,  cos 0.79 / 0.76 / 0.76

Top-1 agreement on such inputs is between 0 and 0.66 and not meaningful (random weights give
nearly input-independent argmaxes). The distance hardly depends on alpha for the ResNets: with
alpha = .02 the ResNet-50 features already differ by 0.8 (relative) after ``layer2``, whose
first block is the first strided octave layer. Random weights are a weak signal (trained
networks are smoother than random ones); the numbers say only that alpha > 0 needs fine-tuning.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from oct3d.models import (
    VanillaMismatchError,
    load_vanilla,
    oct_densenet121,
    oct_mobilenet_v2,
    oct_resnet50,
    oct_resnet101,
    oct_resnext50_32x4d,
)


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics, so a wrong split shows."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = 0.5 + torch.rand(n, generator=generator)
            module.bias.data = 0.2 * torch.randn(n, generator=generator)
            module.running_mean.data = 0.2 * torch.randn(n, generator=generator)
            module.running_var.data = 0.5 + torch.rand(n, generator=generator)
    return model


@pytest.mark.parametrize(
    ("builder", "vanilla"),
    [
        (oct_resnet50, torchvision.models.resnet50),
        (oct_resnext50_32x4d, torchvision.models.resnext50_32x4d),
        (oct_mobilenet_v2, torchvision.models.mobilenet_v2),
        (oct_densenet121, torchvision.models.densenet121),
    ],
    ids=["resnet50", "resnext50_32x4d", "mobilenet_v2", "densenet121"],
)
def test_alpha0_reproduces_torchvision(builder, vanilla):
    torch.manual_seed(0)
    reference = randomise_batchnorm(vanilla(num_classes=10)).eval()
    model = load_vanilla(builder(alpha=0.0, num_classes=10), reference).eval()
    x = torch.randn(2, 3, 65, 57)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert expected.abs().max() > 1e-3  # a meaningful comparison, not two zero outputs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_loads_from_a_state_dict_too():
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2(num_classes=4).eval()
    model = load_vanilla(oct_mobilenet_v2(alpha=0.0, num_classes=4), reference.state_dict()).eval()
    x = torch.randn(1, 3, 33, 35)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_mismatched_architecture_lists_the_keys():
    with torch.device("meta"):
        vanilla = torchvision.models.resnet50()
        model = oct_resnet101(alpha=0.5)
    with pytest.raises(VanillaMismatchError) as info:
        load_vanilla(model, vanilla)
    message = str(info.value)
    assert "missing vanilla weight layer3.6.conv1.weight" in message
    assert "OctResNet" in message


def test_class_count_mismatch_and_exclude():
    torch.manual_seed(0)
    vanilla = torchvision.models.resnet50(num_classes=1000)
    with torch.device("meta"):
        model = oct_resnet50(alpha=0.5, num_classes=10)
    with pytest.raises(VanillaMismatchError, match=r"fc\.weight"):
        load_vanilla(model, vanilla)
    model = oct_resnet50(alpha=0.5, num_classes=10)
    load_vanilla(model, vanilla, exclude=("fc",))
    conv = model.layer1[1].conv2
    torch.testing.assert_close(conv.l2h.weight, vanilla.layer1[1].conv2.weight[: conv.out_high, conv.in_high:])


def test_resnet_alpha_positive_is_the_channel_partition():
    torch.manual_seed(0)
    vanilla = randomise_batchnorm(torchvision.models.resnet50(num_classes=10))
    model = load_vanilla(oct_resnet50(alpha=0.25, num_classes=10), vanilla)
    conv, ref = model.layer2[0].conv2, vanilla.layer2[0].conv2.weight
    oh, ih = conv.out_high, conv.in_high
    assert (oh, ih) == (96, 96)
    torch.testing.assert_close(conv.h2h.weight, ref[:oh, :ih])
    torch.testing.assert_close(conv.h2l.weight, ref[oh:, :ih])
    torch.testing.assert_close(conv.l2l.weight, ref[oh:, ih:])
    bn, ref_bn = model.layer3[2].bn3, vanilla.layer3[2].bn3
    torch.testing.assert_close(bn.bn_l.running_var, ref_bn.running_var[768:])
    entry = model.layer4[0].conv1  # alpha -> 0: h2h and l2h only
    torch.testing.assert_close(entry.l2h.weight, vanilla.layer4[0].conv1.weight[:, 768:])


def test_densenet_alpha_positive_follows_the_concatenation_order():
    # Vanilla concatenation: [stem, layer1, layer2, ...], each piece high-first; octave: all highs, all lows.
    torch.manual_seed(0)
    vanilla = randomise_batchnorm(torchvision.models.densenet121(num_classes=10))
    model = load_vanilla(oct_densenet121(alpha=0.5, num_classes=10), vanilla)
    # denselayer3 of block 1 reads [stem 64 = 32 h + 32 l, layer1 32 = 16 h + 16 l, layer2 32 = 16 h + 16 l].
    low_index = list(range(32, 64)) + list(range(80, 96)) + list(range(112, 128))
    high_index = list(range(0, 32)) + list(range(64, 80)) + list(range(96, 112))
    ours = model.features.denseblock1.denselayer3
    theirs = vanilla.features.denseblock1.denselayer3
    torch.testing.assert_close(ours.conv1.l2h.weight, theirs.conv1.weight[:64][:, low_index])
    torch.testing.assert_close(ours.conv1.h2h.weight, theirs.conv1.weight[:64][:, high_index])
    torch.testing.assert_close(ours.norm1.bn_l.running_mean, theirs.norm1.running_mean[low_index])
    torch.testing.assert_close(ours.norm1.bn_h.weight, theirs.norm1.weight[high_index])


def test_alpha_positive_is_a_warm_start_not_an_identity():
    torch.manual_seed(0)

    def smooth_images(n: int) -> torch.Tensor:
        return torch.nn.functional.interpolate(torch.randn(n, 3, 8, 8), size=(64, 64), mode="bilinear")

    vanilla = torchvision.models.mobilenet_v2(num_classes=10)
    for module in vanilla.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # calibrate the statistics on one batch (cumulative average)
    with torch.no_grad():
        vanilla.train()(smooth_images(8))
    vanilla.eval()
    model = load_vanilla(oct_mobilenet_v2(alpha=0.5, num_classes=10), vanilla).eval()
    x = smooth_images(8)
    with torch.no_grad():
        expected, got = vanilla(x), model(x)
    relative = ((got - expected).norm() / expected.norm()).item()
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=1).mean().item()
    print(f"mobilenet_v2 alpha 0.5 warm start: relative L2 {relative:.3f}, cosine {cosine:.3f}")
    assert 0.05 < relative < 1.5  # it moves, but stays related to the vanilla model
    assert cosine > 0.3
