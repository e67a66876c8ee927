"""2D ImageNet backbones: paper costs, torchvision equivalence at alpha 0, placement, odd sizes.

Costs are counted on the meta device (nothing is allocated), forwards use small odd inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from layouts import assert_same_gradients, map_layouts
from torch import nn

from oct3d.models import (
    OctResNet,
    get_model,
    list_models,
    oct_densenet121,
    oct_mobilenet_v1,
    oct_mobilenet_v2,
    oct_resnet26,
    oct_resnet50,
    oct_resnet101,
    oct_resnet152,
    oct_resnet200,
    oct_resnext50_32x4d,
    oct_resnext101_32x4d,
    oct_se_resnet50,
)
from oct3d.nn import Octave, OctConv
from oct3d.profiling import count_macs, count_params

IMAGE_BUILDERS = [
    oct_resnet26, oct_resnet50, oct_resnet101, oct_resnet152, oct_resnet200, oct_resnext50_32x4d,
    oct_resnext101_32x4d, oct_se_resnet50, oct_mobilenet_v1, oct_mobilenet_v2, oct_densenet121,
]


def meta_cost(build, *args, size=(1, 3, 224, 224), **kwargs) -> tuple[int, int]:
    with torch.device("meta"):
        model = build(*args, **kwargs)
    return count_macs(model, size), count_params(model)


# ----------------------------------------------------------------------------- paper figures
@pytest.mark.parametrize(
    ("alpha", "gmacs", "exact"),
    [
        (0.0, 4.1, 4_089_184_256),
        (0.125, 3.6, 3_565_196_288),
        (0.25, 3.1, 3_103_526_912),
        (0.5, 2.4, 2_367_143_936),
        (0.75, 1.9, 1_880_035_328),
    ],
)
def test_oct_resnet50_matches_paper_table2(alpha, gmacs, exact):
    macs, params = meta_cost(oct_resnet50, alpha=alpha)
    assert round(macs / 1e9, 1) == gmacs
    assert macs == exact  # exact, so any change in placement or pooling arithmetic shows up
    assert round(params / 1e6, 1) == 25.6
    assert params == 25_557_032  # torchvision resnet50, at every alpha


# ----------------------------------------------------------------------------- torchvision equivalence
@pytest.mark.parametrize(
    ("builder", "kwargs", "vanilla", "vanilla_kwargs"),
    [
        (oct_resnet50, {}, torchvision.models.resnet50, {}),
        (oct_resnet101, {}, torchvision.models.resnet101, {}),
        (oct_resnet152, {}, torchvision.models.resnet152, {}),
        (oct_resnext50_32x4d, {}, torchvision.models.resnext50_32x4d, {}),
        (oct_mobilenet_v2, {}, torchvision.models.mobilenet_v2, {}),
        (oct_mobilenet_v2, {"width_mult": 1.125}, torchvision.models.mobilenet_v2, {"width_mult": 1.125}),
        (
            oct_mobilenet_v2, {"width_mult": 1.125, "round_nearest": 1},
            torchvision.models.mobilenet_v2, {"width_mult": 1.125, "round_nearest": 1},
        ),
        (oct_densenet121, {}, torchvision.models.densenet121, {}),
    ],
    ids=["resnet50", "resnet101", "resnet152", "resnext50", "mnv2", "mnv2_1125", "mnv2_1125_r1", "densenet121"],
)
def test_alpha0_is_torchvision(builder, kwargs, vanilla, vanilla_kwargs):
    ours = meta_cost(builder, alpha=0.0, **kwargs)
    theirs = meta_cost(vanilla, **vanilla_kwargs)
    assert ours == theirs


def bottleneck_resnet_cost(layers, groups=1, width_per_group=64, num_classes=1000, size=224):
    """Independent formula for (MACs, params) of a torchvision-layout bottleneck ResNet."""
    macs = params = 0
    hw = size // 2  # stem conv 7x7 stride 2
    params += 3 * 64 * 49 + 2 * 64
    macs += 3 * 64 * 49 * hw * hw
    hw = hw // 2  # max pool
    in_c = 64
    for stage, depth in enumerate(layers):
        planes = 64 * 2**stage
        width = planes * width_per_group // 64 * groups
        out_c = planes * 4
        for block in range(depth):
            stride = 2 if (stage > 0 and block == 0) else 1
            hw_out = hw // stride
            params += in_c * width + width * width // groups * 9 + width * out_c + 2 * (2 * width + out_c)
            macs += in_c * width * hw * hw + (width * width // groups * 9 + width * out_c) * hw_out * hw_out
            if block == 0:
                params += in_c * out_c + 2 * out_c
                macs += in_c * out_c * hw_out * hw_out
            in_c, hw = out_c, hw_out
    params += in_c * num_classes + num_classes
    macs += in_c * num_classes
    return macs, params


def test_cost_formula_agrees_with_torchvision():
    assert bottleneck_resnet_cost((3, 4, 6, 3)) == meta_cost(torchvision.models.resnet50)
    assert bottleneck_resnet_cost((3, 4, 6, 3), 32, 4) == meta_cost(torchvision.models.resnext50_32x4d)


@pytest.mark.parametrize(
    ("builder", "layers", "groups", "wpg"),
    [
        (oct_resnext101_32x4d, (3, 4, 23, 3), 32, 4),
        (oct_resnet26, (2, 2, 2, 2), 1, 64),
        (oct_resnet200, (3, 24, 36, 3), 1, 64),
    ],
)
def test_alpha0_matches_formula(builder, layers, groups, wpg):
    assert meta_cost(builder, alpha=0.0) == bottleneck_resnet_cost(layers, groups, wpg)


def test_se_resnet50_params():
    # SE per block: fc1 (C -> C/16, bias) + excitation (C/16 -> C, bias); independent of alpha.
    _, base = bottleneck_resnet_cost((3, 4, 6, 3))
    se = sum(depth * (2 * c * (c // 16) + c // 16 + c) for depth, c in zip((3, 4, 6, 3), (256, 512, 1024, 2048)))
    assert meta_cost(oct_se_resnet50, alpha=0.0)[1] == base + se
    assert meta_cost(oct_se_resnet50, alpha=0.5)[1] == base + se
    assert round((base + se) / 1e6, 1) == 28.1  # Hu et al.: 28.1 M


def test_mobilenet_v1_alpha0_cost():
    # Howard et al. Table 8: 569 M mult-adds, 4.2 M params (1.0); 325 M, 2.6 M (0.75).
    macs, params = meta_cost(oct_mobilenet_v1, alpha=0.0)
    assert (round(macs / 1e6), round(params / 1e6, 1)) == (569, 4.2)
    macs, params = meta_cost(oct_mobilenet_v1, alpha=0.0, width_mult=0.75)
    assert (round(macs / 1e6), round(params / 1e6, 1)) == (325, 2.6)


@pytest.mark.parametrize("builder", [oct_mobilenet_v1, oct_mobilenet_v2, oct_densenet121], ids=lambda b: b.__name__)
def test_params_do_not_depend_on_alpha(builder):
    def params(alpha):
        with torch.device("meta"):
            return count_params(builder(alpha=alpha))

    assert params(0.0) == params(0.5)


# ----------------------------------------------------------------------------- placement
def test_resnet_placement():
    with torch.device("meta"):
        model = oct_resnet50(alpha=0.25)
    assert isinstance(model.conv1, nn.Conv2d) and not isinstance(model.conv1, OctConv)
    first = model.layer1[0]
    assert first.conv1.alpha_in == 0.0 and first.conv1.alpha_out == 0.25
    assert first.downsample[0].alpha_in == 0.0 and first.downsample[0].alpha_out == 0.25
    for layer in (model.layer1, model.layer2, model.layer3):
        for block in layer:
            assert block.conv2.alpha_in == block.conv2.alpha_out == 0.25
    entry = model.layer4[0]
    assert entry.conv1.alpha_in == 0.25 and entry.conv1.out_low == 0
    assert entry.downsample[0].alpha_in == 0.25 and entry.downsample[0].out_low == 0
    for module in model.layer4.modules():
        if isinstance(module, OctConv):
            assert module.out_low == 0
            assert module is entry.conv1 or module is entry.downsample[0] or module.is_vanilla


def test_resnet_alphas_override_and_octave_head():
    with torch.device("meta"):
        model = oct_resnet26(alphas=(0.5, 0.25, 0.25, 0.25), num_classes=7).eval()
    assert model.layer2[0].conv1.alpha_in == 0.5 and model.layer2[0].conv2.alpha_out == 0.25
    assert model.layer4[0].conv3.out_low > 0
    seen = []
    model.layer4.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.device("meta"):
        assert model(torch.randn(1, 3, 45, 39)).shape == (1, 7)
    assert isinstance(seen[0], Octave) and seen[0].low is not None


def test_mobilenet_v1_schedule():
    with torch.device("meta"):
        model = oct_mobilenet_v1(alpha=0.5)
    blocks = list(model.features)[1:]
    assert len(blocks) == 13
    assert [b.conv1.alpha_in for b in blocks] == [0.0] + [0.5] * 10 + [0.0] * 2
    assert [b.conv2.alpha_out for b in blocks] == [0.5] * 10 + [0.0] * 3
    assert all(b.conv1.depthwise for b in blocks)


def test_mobilenet_v2_only_the_middle_is_octave():
    with torch.device("meta"):
        model = oct_mobilenet_v2(alpha=0.375)
    blocks = list(model.features)[1:18]
    assert model.block_alphas == (0.0,) + (0.375,) * 12 + (0.0,) * 4
    for block, alpha in zip(blocks, model.block_alphas):
        convs = [m for m in block.modules() if isinstance(m, OctConv)]
        assert convs[0].alpha_in == 0.0 and convs[-1].alpha_out == 0.0  # plain in and out
        assert all(c.alpha_out == alpha for c in convs[:-1])


def test_densenet_placement():
    with torch.device("meta"):
        model = oct_densenet121(alpha=0.5)
    f = model.features
    assert f.conv0.alpha_in == 0.0 and f.conv0.alpha_out == 0.5
    assert f.denseblock2.denselayer5.conv1.alpha_in == 0.5
    assert f.denseblock1.pieces[0] == (32, 32) and set(f.denseblock1.pieces[1:]) == {(16, 16)}
    assert f.transition2.conv.alpha_out == 0.5 and f.transition3.conv.out_low == 0
    assert all(m.is_vanilla for m in f.denseblock4.modules() if isinstance(m, OctConv))


def test_densenet_uneven_alpha_tracks_channels_exactly():
    # 0.3 of 64 and of 32 do not add up to 0.3 of 96 when floored: the low counts must still match.
    with torch.device("meta"):
        model = oct_densenet121(alpha=0.3, num_classes=5).eval()
        block = model.features.denseblock1
        assert block.denselayer3.conv1.in_low == sum(lo for _, lo in block.pieces[:3])
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)  # shape checks raise on any mismatch


# ----------------------------------------------------------------------------- odd sizes
_MODELS: dict[str, nn.Module] = {}


def small_model(builder) -> nn.Module:
    """One eval-mode instance per builder for the whole module (10 classes), built on first use."""
    if builder.__name__ not in _MODELS:
        alpha = 0.25 if "resnext" in builder.__name__ else 0.5
        torch.manual_seed(0)
        _MODELS[builder.__name__] = builder(alpha=alpha, num_classes=10).eval()
    return _MODELS[builder.__name__]


# Real forwards for one builder of each code path (resnet101/152/200 and resnext101 only repeat the
# blocks of resnet26/resnext50); every builder also runs shape-only on the meta device below.
COMPUTED_BUILDERS = [
    oct_resnet26, oct_resnext50_32x4d, oct_se_resnet50, oct_mobilenet_v1, oct_mobilenet_v2, oct_densenet121,
]


@pytest.mark.parametrize("builder", COMPUTED_BUILDERS, ids=lambda b: b.__name__)
def test_odd_image_size(builder):
    with torch.no_grad():
        out = small_model(builder)(torch.randn(1, 3, 65, 57))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("builder", IMAGE_BUILDERS, ids=lambda b: b.__name__)
def test_odd_image_size_shapes_every_builder(builder):
    alpha = 0.25 if "resnext" in builder.__name__ else 0.5
    with torch.device("meta"):
        model = builder(alpha=alpha, num_classes=10).eval()
        for size in ((225, 199), (65, 57)):
            assert model(torch.randn(2, 3, *size)).shape == (2, 10)


@pytest.mark.parametrize("size", [(1, 1), (7, 9)])
def test_tiny_odd_sizes(size):
    for builder in (oct_resnet26, oct_mobilenet_v1):
        with torch.no_grad():
            assert small_model(builder)(torch.randn(2, 3, *size)).shape == (2, 10)


def test_densenet_odd_transition_sizes():
    # 6 high -> 3 and its 3 low -> 2: a floored low pool would give 1 (the official code's bug on odd sizes).
    # The octave layers check every branch's shape, so a shape-only forward on the meta device suffices.
    with torch.device("meta"):
        model = oct_densenet121(alpha=0.5, num_classes=10).eval()
        for size in ((48, 41), (50, 37), (225, 199)):
            assert model(torch.randn(1, 3, *size)).shape == (1, 10)


# ----------------------------------------------------------------------------- errors and registry
def test_bad_arguments():
    with pytest.raises(ValueError, match="alphas"):
        oct_resnet50(alphas=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="alpha"):
        oct_resnet50(alpha=1.0)
    with pytest.raises(ValueError, match="groups=32"):
        oct_resnext50_32x4d(alpha=0.125)
    with pytest.raises(ValueError, match="num_classes"):
        oct_mobilenet_v2(num_classes=0)
    with pytest.raises(ValueError, match="width_mult"):
        oct_mobilenet_v1(width_mult=-1)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        small_model(oct_resnet26)(torch.randn(3, 32, 32))


def test_registry_and_builder_types():
    names = {b.__name__ for b in IMAGE_BUILDERS}
    assert names <= set(list_models("image"))
    with torch.device("meta"):
        model = get_model("oct_resnet50", alpha=0.25, num_classes=5)
    assert isinstance(model, OctResNet) and model.fc.out_features == 5


@pytest.mark.parametrize(
    ("builder", "conv_path"),
    [
        ("oct_resnet50", "layer4.0.conv2"),
        ("oct_mobilenet_v1", "features.12.conv1"),
        ("oct_mobilenet_v2", "features.14.conv.1.0"),
    ],
)
def test_octave_models_pool_before_strided_ratio0_convs_like_the_official_code(builder, conv_path):
    """At alpha > 0 a strided ratio-0 conv average-pools by its stride and convolves at stride 1."""
    from oct3d.models import get_model

    official = get_model(builder, alpha=0.5, num_classes=10).get_submodule(conv_path)
    strided = get_model(builder, alpha=0.5, num_classes=10, pool_first=False).get_submodule(conv_path)
    vanilla = get_model(builder, alpha=0.0, num_classes=10).get_submodule(conv_path)
    assert official.is_vanilla and official.pool_first and official.h2h.stride == (1, 1)
    assert not strided.pool_first and strided.h2h.stride == (2, 2)
    assert not vanilla.pool_first and vanilla.h2h.stride == (2, 2)
    x = torch.randn(1, official.in_channels, 9, 7)
    expected = official.h2h(F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False))
    torch.testing.assert_close(official(x), expected)


def test_pool_first_rejects_non_bool():
    with pytest.raises(TypeError, match="pool_first"):
        oct_resnet50(alpha=0.5, pool_first="yes")


@pytest.mark.parametrize("builder", [oct_resnet26, oct_mobilenet_v2, oct_densenet121])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_channels_last_on_cpu_runs_the_same_network(builder, alpha):
    """On CPU a 2D backbone converts its input to channels_last once; every octave layer sees that
    layout, and values and gradients are those of the channels-first network (float64: exact up
    to summation order)."""
    torch.manual_seed(0)
    fast = builder(alpha=alpha, num_classes=10).double().eval()
    plain = builder(alpha=alpha, num_classes=10, channels_last=False).double().eval()
    plain.load_state_dict(fast.state_dict())
    layouts = {fast: [], plain: []}
    for model, seen in layouts.items():
        for module in model.modules():
            if isinstance(module, OctConv):
                module.register_forward_pre_hook(lambda m, args, seen=seen: seen.extend(map_layouts(args[0])))
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    got, want = fast(x), plain(x)
    assert set(layouts[fast]) == {"channels_last"} and set(layouts[plain]) == {"contiguous"}
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert_same_gradients(fast, got, plain, want, rtol=1e-7, atol=1e-9)
    with pytest.raises(TypeError, match="channels_last"):
        builder(channels_last="yes")


def _conv_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd) and m.weight.dim() >= 4]


@pytest.mark.parametrize("builder", [oct_resnet26, oct_mobilenet_v2, oct_densenet121])
def test_builders_store_conv_weights_channels_last_unless_told_not_to(builder):
    """A model that runs channels_last stores its convolution weights so (no oneDNN weight copies in
    training); channels_last=False keeps them contiguous; a state dict moves between the two."""
    fast, plain = builder(alpha=0.5, num_classes=10), builder(alpha=0.5, num_classes=10, channels_last=False)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(fast))
    assert all(w.is_contiguous() for w in _conv_weights(plain))
    assert all(p.is_contiguous() for p in fast.parameters() if p.dim() < 4)
    plain.load_state_dict(fast.state_dict())
    fast.load_state_dict(plain.state_dict())
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(fast))



@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_residual_add_in_place_keeps_values_and_gradients(monkeypatch, alpha):
    """The blocks add the shortcut into the last BatchNorm's output in place (as torchvision does);
    values and gradients are those of the out-of-place per-branch sum."""
    from oct3d.models import blocks

    torch.manual_seed(0)
    fast = oct_resnet26(alpha=alpha, num_classes=10).double().train()
    plain = oct_resnet26(alpha=alpha, num_classes=10).double().train()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    got = fast(x)
    monkeypatch.setattr(blocks, "_branch_pairs", lambda a, b: None)
    want = plain(x)
    torch.testing.assert_close(got, want)
    assert_same_gradients(fast, got, plain, want, rtol=1e-9, atol=1e-10)
