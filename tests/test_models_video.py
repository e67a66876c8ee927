"""Video backbones: costs against pytorchvideo/torchvision peers, octave modes, odd clip sizes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from layouts import assert_same_gradients, map_layouts
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from oct3d.models import (
    OctTemporalMaxPool,
    get_model,
    list_models,
    oct_c2d_r50,
    oct_i3d_r50,
    oct_r3d_18,
    oct_r3d_34,
    oct_r3d_50,
    oct_slow_r50,
)
from oct3d.nn import Octave
from oct3d.profiling import count_macs, count_params

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pytorchvideo imports emit deprecation warnings
    from pytorchvideo.models.hub.resnet import c2d_r50, i3d_r50, slow_r50
from torchvision.models.video import r3d_18
from torchvision.models.video.resnet import BasicBlock, BasicStem, Bottleneck, Conv3DSimple, VideoResNet

CLIP = (1, 3, 8, 224, 224)
R3D_CLIP = (1, 3, 16, 112, 112)
BUILDERS = [oct_i3d_r50, oct_c2d_r50, oct_slow_r50, oct_r3d_18, oct_r3d_34, oct_r3d_50]


def _meta(builder, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return builder(**kwargs)


def _tv_r3d(block, depths) -> nn.Module:
    return VideoResNet(block, [Conv3DSimple] * 4, depths, BasicStem, num_classes=400)


PEERS = [
    (oct_i3d_r50, i3d_r50, CLIP),
    (oct_c2d_r50, c2d_r50, CLIP),
    (oct_slow_r50, slow_r50, CLIP),
    (oct_r3d_18, r3d_18, R3D_CLIP),
    (oct_r3d_34, lambda: _tv_r3d(BasicBlock, [3, 4, 6, 3]), R3D_CLIP),
    (oct_r3d_50, lambda: _tv_r3d(Bottleneck, [3, 4, 6, 3]), R3D_CLIP),
]


@pytest.mark.parametrize(("builder", "peer", "size"), PEERS, ids=[p[0].__name__ for p in PEERS])
def test_alpha0_costs_equal_vanilla_peer(builder, peer, size):
    ours = _meta(builder, alpha=0.0)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peer()
    assert count_params(ours) == count_params(theirs)
    assert count_macs(ours, size) == count_macs(theirs, size)


def test_i3d_reference_figures():
    model = _meta(oct_i3d_r50, alpha=0.0)
    assert count_params(model) == 28_043_472
    assert count_macs(model, CLIP) == 28_407_660_544  # 28.4 GMACs (paper: 28.1)


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_costs_across_alpha_and_mode(builder):
    size = R3D_CLIP if "r3d" in builder.__name__ else CLIP
    small = {"depths": (1, 1, 2, 1)}  # the comparison holds at any depth; fewer blocks keep the test fast
    vanilla = _meta(builder, alpha=0.0, **small)
    spatial = _meta(builder, alpha=0.5, octave="spatial", **small)
    spatiotemporal = _meta(builder, alpha=0.5, octave="spatiotemporal", **small)
    # The four octave paths partition the vanilla weight: parameters do not depend on alpha or mode.
    assert count_params(vanilla) == count_params(spatial) == count_params(spatiotemporal)
    macs = [count_macs(m, size) for m in (vanilla, spatial, spatiotemporal)]
    assert macs[0] > macs[1] > macs[2]


def test_spatial_octave_cost_matches_formula_on_one_layer():
    # A 1x3x3 octave conv at alpha .5 costs (1-a)^2 + a(1-a)/2 + a^2/4 = 1/4 + 3/16 = 7/16 of the vanilla
    # one in spatial mode (docs/semantics.md section 2); spatiotemporal divides the low-resolution terms by 8
    # instead of 4: 1/4 + 3/32 = 11/32.
    def macs(conv, x):
        with FlopCounterMode(display=False) as counter:
            conv(x)
        return counter.get_total_flops() // 2

    vanilla = _meta(oct_c2d_r50, alpha=0.0).layer2[1].conv2
    spatial = _meta(oct_c2d_r50, alpha=0.5).layer2[1].conv2
    spatiotemporal = _meta(oct_c2d_r50, alpha=0.5, octave="spatiotemporal").layer2[1].conv2
    with torch.device("meta"):
        base = macs(vanilla, torch.zeros(1, 128, 8, 28, 28))
        half_s = macs(spatial, Octave(torch.zeros(1, 64, 8, 28, 28), torch.zeros(1, 64, 8, 14, 14)))
        half_st = macs(spatiotemporal, Octave(torch.zeros(1, 64, 8, 28, 28), torch.zeros(1, 64, 4, 14, 14)))
    assert half_s * 16 == base * 7
    assert half_st * 32 == base * 11


ODD_CLIPS = [(oct_i3d_r50, (7, 113, 97)), (oct_r3d_18, (7, 113, 97)), (oct_c2d_r50, (5, 33, 31)),
             (oct_slow_r50, (5, 33, 31)), (oct_r3d_34, (5, 33, 31)), (oct_r3d_50, (5, 33, 31))]


@pytest.mark.parametrize(("builder", "size"), ODD_CLIPS, ids=[b.__name__ for b, _ in ODD_CLIPS])
@pytest.mark.parametrize("octave", ["spatial", "spatiotemporal"])
def test_odd_clip_runs(builder, size, octave):
    torch.manual_seed(0)
    model = builder(alpha=0.5, octave=octave, base_width=4, depths=(1, 1, 1, 1), num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 3)
    assert torch.isfinite(out).all()


def test_demo_config_trains_one_step():
    # The training demo's model: oct_i3d_r50(base_width=16, depths=(1, 1, 1, 1), num_classes=4).
    torch.manual_seed(0)
    model = oct_i3d_r50(base_width=16, depths=(1, 1, 1, 1), num_classes=4)
    out = model(torch.randn(2, 3, 4, 32, 32))
    F.cross_entropy(out, torch.tensor([0, 3])).backward()
    assert out.shape == (2, 4)
    assert all(p.grad is not None for p in model.parameters())


def test_placement_follows_spec():
    model = oct_i3d_r50(alpha=0.5, base_width=8, depths=(2, 1, 1, 2))
    assert isinstance(model.conv1, nn.Conv3d)  # stem vanilla
    assert model.layer1[0].conv1.alpha_in == 0.0 and model.layer1[0].conv1.alpha_out == 0.5
    assert model.layer1[0].downsample[0].alpha_in == 0.0
    assert model.layer3[0].conv2.alpha_in == model.layer3[0].conv2.alpha_out == 0.5
    assert model.layer4[0].conv1.alpha_in == 0.5 and model.layer4[0].conv1.alpha_out == 0.0
    assert model.layer4[0].downsample[0].alpha_in == 0.5 and model.layer4[0].downsample[0].alpha_out == 0.0
    assert model.layer4[1].conv2.is_vanilla
    # I3D temporal kernels: res2 (3), res5 cycles (1, 3); spatial kernels 1x3x3 with stride on conv2.
    assert [b.conv1.kernel_size[0] for b in model.layer1] == [3, 3]
    assert [b.conv1.kernel_size[0] for b in model.layer4] == [1, 3]
    assert model.layer2[0].conv2.kernel_size == (1, 3, 3) and model.layer2[0].conv2.stride == (1, 2, 2)


def test_feature_shapes_in_both_modes():
    x = torch.randn(1, 3, 8, 64, 64)
    for octave, low_t in (("spatial", 4), ("spatiotemporal", 2)):
        model = oct_c2d_r50(alpha=0.5, octave=octave, base_width=8, depths=(1, 1, 1, 1)).eval()
        with torch.no_grad():
            mid = model.temporal_pool(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
        assert isinstance(mid, Octave)
        assert mid.high.shape == (1, 16, 4, 16, 16)
        assert mid.low.shape == (1, 16, low_t, 8, 8)


def test_alphas_override_with_octave_res5():
    model = oct_slow_r50(alphas=(0.25, 0.5, 0.5, 0.5), base_width=8, depths=(1, 1, 1, 1), num_classes=2).eval()
    assert model.layer1[0].conv2.alpha_in == 0.25
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 4, 33, 33))
        out = model(torch.randn(1, 3, 4, 33, 33))
    assert isinstance(feats, Octave) and feats.low is not None
    assert out.shape == (1, 2)


@pytest.mark.parametrize("frames", [2, 3, 5, 6, 7, 10])
def test_temporal_pool_keeps_octave_sizes(frames):
    pool = OctTemporalMaxPool(2, "spatiotemporal")
    high = torch.randn(1, 2, frames, 6, 6)
    low = torch.randn(1, 2, (frames + 1) // 2, 3, 3)
    out = pool(Octave(high, low))
    torch.testing.assert_close(out.high, F.max_pool3d(high, (2, 1, 1)))
    assert out.low.shape[2] == (frames // 2 + 1) // 2
    spatial = OctTemporalMaxPool(2, "spatial")(Octave(high, torch.randn(1, 2, frames, 3, 3)))
    assert spatial.low.shape[2] == frames // 2
    plain = torch.randn(1, 2, frames, 4, 4)
    torch.testing.assert_close(pool(plain), F.max_pool3d(plain, (2, 1, 1)))


def test_registered_as_video_models():
    names = set(list_models("video"))
    assert {b.__name__ for b in BUILDERS} <= names
    assert isinstance(get_model("oct_r3d_18", alpha=0.25, base_width=8, depths=(1, 1, 1, 1)), nn.Module)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alphas": (0.5, 0.5, 0.5)}, ValueError, "alphas"),
        ({"alphas": (0.5, 0.5, 1.5, 0.0)}, ValueError, "alphas"),
        ({"depths": (1, 1, 0, 1)}, ValueError, "depths"),
        ({"octave": "temporal"}, ValueError, "octave"),
        ({"base_width": 0}, ValueError, "base_width"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"alpha": 2.0}, ValueError, "alpha"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        oct_c2d_r50(**{"base_width": 8, "depths": (1, 1, 1, 1), **kwargs})


def test_bad_input_shape():
    model = oct_c2d_r50(base_width=8, depths=(1, 1, 1, 1)).eval()
    with pytest.raises(ValueError, match="N, C, T, H, W"):
        model(torch.randn(1, 3, 32, 32))


def test_octave_video_resnet_pools_before_res5s_strided_conv():
    """Oct-I3D at alpha > 0 follows the official code at res5's strided ratio-0 conv; alpha 0 stays strided."""
    official = oct_i3d_r50(alpha=0.5).layer4[0].conv2
    assert official.pool_first and official.h2h.stride == (1, 1, 1)
    assert not oct_i3d_r50(alpha=0.0).layer4[0].conv2.pool_first
    assert not oct_i3d_r50(alpha=0.5, pool_first=False).layer4[0].conv2.pool_first


@pytest.mark.parametrize("octave", ["spatial", "spatiotemporal"])
def test_channels_last_on_cpu_runs_the_same_network(octave):
    """On CPU a video backbone converts its clip to channels_last_3d once, keeps it through the
    stages, and computes the channels-first network's values and gradients."""
    torch.manual_seed(0)
    kwargs = dict(alpha=0.5, octave=octave, depths=(1, 1, 1, 1), base_width=8, num_classes=5)
    fast = oct_i3d_r50(**kwargs).eval()
    plain = oct_i3d_r50(**kwargs, channels_last=False).eval()
    plain.load_state_dict(fast.state_dict())
    seen = []
    for model in (fast, plain):
        model.layer2.register_forward_hook(lambda module, args, out: seen.append(
            set(map_layouts(out)) == {"channels_last"}))
    # float32: CPU conv3d has no channels_last float64 kernel (slow_conv3d returns channels-first).
    x = torch.randn(1, 3, 8, 32, 32)
    got, want = fast(x), plain(x)
    assert seen == [True, False]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert_same_gradients(fast, got, plain, want, rtol=1e-3, atol=1e-4)
    with pytest.raises(TypeError, match="channels_last"):
        oct_i3d_r50(channels_last=1)
