"""pytorchvideo's own builders with oct3d's octave callables (OctaveConv, OctaveSum, ...)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

from oct3d.interop import (
    OctaveActivation,
    OctaveBatchNorm,
    OctaveConv,
    OctaveSum,
    create_octave_resnet,
)
from oct3d.models import load_vanilla, oct_i3d_r50
from oct3d.models.blocks import OctBottleneck
from oct3d.nn import Octave

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from pytorchvideo.models.resnet import create_bottleneck_block, create_res_block, create_resnet

# pytorchvideo's hub I3D-R50 configuration (pytorchvideo.models.hub.resnet.i3d_r50).
I3D = dict(
    stem_conv_kernel_size=(5, 7, 7), stage1_pool=nn.MaxPool3d,
    stage_conv_a_kernel_size=((3, 1, 1), [(3, 1, 1), (1, 1, 1)], [(3, 1, 1), (1, 1, 1)], [(1, 1, 1), (3, 1, 1)]),
)
# A 4 x 32 x 32 clip with a narrow stem: I3D pools time once after res2 (2 frames at the head), Slow keeps 4.
SMALL = dict(stem_dim_out=8, model_num_class=5)


def _randomize_batchnorm(model: nn.Module, seed: int = 1) -> None:
    # Random statistics and affine parameters, so that a wrongly split or misplaced norm shows.
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for tensor, low, high in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 1.5),
                                      (m.weight.data, 0.5, 1.5), (m.bias.data, -0.5, 0.5)):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)


def _vanilla(config: dict, frames_at_head: int) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_resnet(**config, **SMALL, head_pool_kernel_size=(frames_at_head, 1, 1))
    _randomize_batchnorm(model)
    return model.eval()


@pytest.mark.parametrize(("config", "frames_at_head"), [({}, 4), (I3D, 2)], ids=["slow_r50", "i3d_r50"])
def test_alpha0_is_create_resnet(config, frames_at_head):
    vanilla = _vanilla(config, frames_at_head)
    model = create_octave_resnet(alpha=0.0, **config, **SMALL, head_pool_kernel_size=(frames_at_head, 1, 1))
    # Same module tree (names and parameter count), so load_vanilla matches every key by name.
    assert {n for n, _ in vanilla.named_modules()} <= {n for n, _ in model.named_modules()}
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in vanilla.parameters())
    load_vanilla(model, vanilla).eval()
    clip = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(clip), vanilla(clip), rtol=1e-5, atol=1e-5)


def test_octave_resnet_carries_octave_trains_and_matches_oct_i3d():
    model = create_octave_resnet(alpha=0.5, **I3D, **SMALL, head_pool_kernel_size=(2, 1, 1))
    seen = {}
    for stage in (1, 3, 4, 5):  # res2, res3, res4 (octave) and res5 (vanilla); blocks[2] is I3D's pool
        for i, block in enumerate(model.blocks[stage].res_blocks):
            block.register_forward_hook(lambda m, a, out, key=(stage, i): seen.__setitem__(key, out))
    clip = torch.randn(2, 3, 4, 32, 32)
    logits = model(clip)
    assert logits.shape == (2, 5)
    for (stage, _), out in seen.items():
        if stage == 5:
            assert isinstance(out, torch.Tensor) and not isinstance(out, Octave)
        else:
            assert isinstance(out, Octave) and out.low is not None
            assert out.high.shape[1] == out.low.shape[1]  # alpha .5 splits every stage width evenly
            assert out.low.shape[-2:] == tuple((s + 1) // 2 for s in out.high.shape[-2:])
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The low branch learns: the shortcut's L->L path, and the zero-initialised last norm of the branch.
    block = model.blocks[3].res_blocks[0]
    assert block.branch1_conv.l2l.weight.grad.abs().sum() > 0
    assert block.branch2.norm_c.bn_l.weight.grad.abs().sum() > 0
    # Each path starts with the vanilla layer's Kaiming std (fan out of the whole layer), not its own.
    conv_b = model.blocks[3].res_blocks[1].branch2.conv_b
    vanilla_std = (2.0 / (conv_b.out_channels * 9)) ** 0.5
    for path in (conv_b.h2h, conv_b.h2l, conv_b.l2h, conv_b.l2l):
        assert abs(path.weight.std().item() / vanilla_std - 1) < 0.2
    # pytorchvideo's init zeroes each residual branch's last norm: both octave branches too.
    norm_c = model.blocks[3].res_blocks[0].branch2.norm_c
    assert torch.count_nonzero(norm_c.bn_h.weight) == 0 and torch.count_nonzero(norm_c.bn_l.weight) == 0

    # The same network as oct3d's hand-written Oct-I3D: same weights (from one vanilla model), same logits.
    vanilla = _vanilla(I3D, 2)
    ours = load_vanilla(oct_i3d_r50(alpha=0.5, base_width=8, num_classes=5), vanilla).eval()
    load_vanilla(model, vanilla).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(clip), ours(clip), rtol=1e-4, atol=1e-5)


def test_create_res_block_with_octave_callables_equals_oct_bottleneck():
    # One strided octave bottleneck assembled by pytorchvideo from the callables in its docstring.
    conv = OctaveConv.partial(alpha_in=0.5, alpha_out=0.5)
    block = create_res_block(
        dim_in=16, dim_inner=8, dim_out=32, bottleneck=create_bottleneck_block, branch_fusion=OctaveSum(),
        conv_a_kernel_size=(3, 1, 1), conv_a_stride=(1, 1, 1), conv_a_padding=(1, 0, 0), conv_a=conv,
        conv_b_kernel_size=(1, 3, 3), conv_b_stride=(1, 2, 2), conv_b_padding=(0, 1, 1), conv_b=conv,
        conv_c=conv, conv_skip=conv, norm=functools.partial(OctaveBatchNorm, alpha=0.5),
        activation_bottleneck=OctaveActivation, activation_block=functools.partial(OctaveActivation, nn.ReLU),
    )
    reference = OctBottleneck(3, 16, 8, 32, stride=(1, 2, 2), kernel_a=(3, 1, 1), kernel_b=(1, 3, 3))
    names = {"conv1": "branch2.conv_a", "bn1": "branch2.norm_a", "conv2": "branch2.conv_b",
             "bn2": "branch2.norm_b", "conv3": "branch2.conv_c", "bn3": "branch2.norm_c",
             "downsample.0": "branch1_conv", "downsample.1": "branch1_norm"}
    _randomize_batchnorm(block)
    state = block.state_dict()
    mapped = {}
    for key in reference.state_dict():
        ours, rest = next((k, key[len(k):]) for k in names if key.startswith(k + "."))
        mapped[key] = state[names[ours] + rest]
    assert len(mapped) == len(state)  # every pytorchvideo key found its place
    reference.load_state_dict(mapped)
    block.eval(), reference.eval()
    x = Octave(torch.randn(2, 8, 4, 9, 11), torch.randn(2, 8, 4, 5, 6))  # odd sizes
    with torch.no_grad():
        out, expected = block(x), reference(x)
    assert isinstance(out, Octave)
    torch.testing.assert_close(out.high, expected.high)
    torch.testing.assert_close(out.low, expected.low)


def test_callables_reject_bad_input():
    with pytest.raises(ValueError, match="padding"):
        OctaveConv(8, 8, (1, 3, 3), padding=(0, 0, 0))
    with pytest.raises(ValueError, match="alpha_in"):
        OctaveConv.partial(alpha_in=1.0)
    with pytest.raises(TypeError, match="activation"):
        OctaveActivation(nn.ReLU())
    with pytest.raises(ValueError, match="alphas"):
        create_octave_resnet(alphas=(0.5, 0.5), **SMALL)
    with pytest.raises(ValueError, match="vanilla"):
        create_octave_resnet(alphas=(0.5, 0.5, 0.5, 0.5), **SMALL)
    # A plain tensor and an Octave cannot be summed: octave_add names the problem.
    with pytest.raises(TypeError, match="low branch"):
        OctaveSum()(torch.zeros(1, 2, 1, 2, 2), Octave(torch.zeros(1, 1, 1, 2, 2), torch.zeros(1, 1, 1, 1, 1)))
