"""Octave operator family against an independent dense reference (docs/semantics.md section 2).

The reference below shares no code with oct3d: pooling is a NaN-padded reshape-mean,
upsampling is ``repeat_interleave`` then crop, and the convolutions are functional calls
with weights taken from the module's state dict by key.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from oct3d.nn import (
    Octave,
    OctAvgPool,
    OctAvgPool1d,
    OctAvgPool2d,
    OctAvgPool3d,
    OctBatchNorm,
    OctBatchNorm2d,
    OctConv,
    OctConv1d,
    OctConv2d,
    OctConv3d,
    OctConvTranspose2d,
    OctDropout,
    OctGlobalAvgPool,
    OctInstanceNorm,
    OctMap,
    OctMaxPool,
    OctMaxPool1d,
    OctMaxPool2d,
    OctMaxPool3d,
    OctReLU,
    from_octave,
    map_octave,
    octave_add,
    to_octave,
)
from oct3d.nn.octave import low_size

torch.manual_seed(0)
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ----------------------------------------------------------------------------- reference
def ref_pool(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """Average over non-overlapping windows; a partial border window averages what it covers."""
    for axis, f in enumerate(factors, start=2):
        if f == 1:
            continue
        n = x.shape[axis]
        m = math.ceil(n / f)
        pad_shape = list(x.shape)
        pad_shape[axis] = m * f - n
        x = torch.cat([x, torch.full(pad_shape, float("nan"), dtype=x.dtype)], dim=axis)
        shape = list(x.shape)
        shape[axis:axis + 1] = [m, f]
        x = x.reshape(shape).nanmean(dim=axis + 1)
    return x


def ref_up(x: torch.Tensor, factors: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
    for axis, f in enumerate(factors, start=2):
        x = x.repeat_interleave(f, dim=axis)
    return x[(slice(None), slice(None)) + tuple(slice(0, n) for n in size)]


def ref_octconv(layer: OctConv, high: torch.Tensor, low: torch.Tensor | None):
    """Y_high = h2h(pool(X_h, s)) + up(l2h(pool(X_l, s on non-octave axes)));
    Y_low = l2l(pool(X_l, s)) + h2l(pool(X_h, s * p))."""
    sd = layer.state_dict()
    dims = layer.dims
    s = layer.stride
    p = tuple(2 if a else 1 for a in layer.axes)
    pad = tuple(d * (k - 1) // 2 for k, d in zip(layer.kernel_size, layer.dilation))

    def conv(path: str, x: torch.Tensor) -> torch.Tensor:
        w = sd[f"{path}.weight"]
        groups = w.shape[0] if layer.depthwise else layer.groups
        return CONV[dims](x, w, sd.get(f"{path}.bias"), 1, pad, layer.dilation, groups)

    if layer.in_low == 0 and layer.out_low == 0:
        # The vanilla case is the strided convolution itself (docs/semantics.md section 2).
        return CONV[dims](high, sd["h2h.weight"], sd.get("h2h.bias"), s, pad, layer.dilation, layer.groups), None
    y_high = conv("h2h", ref_pool(high, s))
    if low is not None and "l2h.weight" in sd:
        l2h_pool = tuple(1 if pi == 2 else si for si, pi in zip(s, p))
        up = tuple(2 if (pi == 2 and si == 1) else 1 for si, pi in zip(s, p))
        y_high = y_high + ref_up(conv("l2h", ref_pool(low, l2h_pool)), up, tuple(y_high.shape[2:]))
    if layer.out_low == 0:
        return y_high, None
    y_low = None
    if low is not None and "l2l.weight" in sd:
        y_low = conv("l2l", ref_pool(low, s))
    if "h2l.weight" in sd:
        part = conv("h2l", ref_pool(high, tuple(si * pi for si, pi in zip(s, p))))
        y_low = part if y_low is None else y_low + part
    return y_high, y_low


def make_input(layer: OctConv, batch: int, size: tuple[int, ...], dtype=torch.float32):
    high = torch.randn(batch, layer.in_high, *size, dtype=dtype)
    if layer.in_low == 0:
        return high, None
    low_size = tuple(math.ceil(n / 2) if a else n for n, a in zip(size, layer.axes))
    return high, torch.randn(batch, layer.in_low, *low_size, dtype=dtype)


def run(layer: OctConv, high, low, reference: bool = False):
    x = high if low is None else Octave(high, low)
    y = layer.forward_reference(x) if reference else layer(x)
    if isinstance(y, Octave):
        return y.high, y.low
    return y, None


def with_random_bias_and_bn_like_weights(layer: OctConv) -> OctConv:
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def assert_matches_reference(layer: OctConv, size, batch=2, atol=1e-5):
    high, low = make_input(layer, batch, size)
    expected = ref_octconv(layer, high, low)
    for reference in (False, True):
        got = run(layer, high, low, reference=reference)
        assert got[0].shape == expected[0].shape
        torch.testing.assert_close(got[0], expected[0], atol=atol, rtol=1e-4)
        if expected[1] is None:
            assert got[1] is None
        else:
            assert got[1].shape == expected[1].shape
            torch.testing.assert_close(got[1], expected[1], atol=atol, rtol=1e-4)
    return expected


# ----------------------------------------------------------------------------- grid
SIZES = {1: (11,), 2: (9, 7), 3: (5, 7, 9)}
ALPHAS = [(0.0, 0.5), (0.5, 0.5), (0.5, 0.0), (0.25, 0.75), (0.75, 0.25)]
STRIDES = {1: [1, 2], 2: [1, 2, (1, 2)], 3: [1, 2, (1, 2, 2)]}


def grid():
    for dims in (1, 2, 3):
        modes = ["spatial", "spatiotemporal"] if dims == 3 else ["spatial"]
        for (a_in, a_out), stride, octave, kernel in itertools.product(ALPHAS, STRIDES[dims], modes, (1, 3)):
            yield dims, a_in, a_out, stride, octave, kernel


@pytest.mark.parametrize(("dims", "alpha_in", "alpha_out", "stride", "octave", "kernel"), list(grid()))
def test_matches_independent_reference(dims, alpha_in, alpha_out, stride, octave, kernel):
    layer = with_random_bias_and_bn_like_weights(
        OctConv(dims, 8, 8, kernel, alpha_in, alpha_out, stride=stride, octave=octave, bias=True)
    )
    assert_matches_reference(layer, SIZES[dims])


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("octave", ["spatial", "spatiotemporal"])
def test_grouped_and_dilated(dims, octave):
    if dims < 3 and octave == "spatiotemporal":
        pytest.skip("spatiotemporal is 3D only")
    layer = OctConv(dims, 16, 8, 3, 0.5, 0.5, stride=1, dilation=2, groups=4, octave=octave)
    assert_matches_reference(layer, tuple(n + 2 for n in SIZES[dims]))
    strided = OctConv(dims, 16, 16, 3, 0.5, 0.5, stride=2, groups=2, octave=octave)
    assert_matches_reference(strided, SIZES[dims])


@pytest.mark.parametrize("dims", [2, 3])
def test_depthwise_keeps_only_h2h_and_l2l(dims):
    layer = OctConv(dims, 8, 8, 3, 0.5, 0.5, groups=8, stride=2)
    assert layer.depthwise
    keys = set(layer.state_dict())
    assert keys == {"h2h.weight", "l2l.weight"}
    assert layer.h2h.weight.shape[:2] == (4, 1)
    assert_matches_reference(layer, SIZES[dims])


@settings(max_examples=40, deadline=None)
@given(
    dims=st.sampled_from([1, 2, 3]),
    alpha_in=st.sampled_from([0.0, 0.125, 0.25, 0.5, 0.75]),
    alpha_out=st.sampled_from([0.0, 0.125, 0.25, 0.5, 0.75]),
    spatiotemporal=st.booleans(),
    kernel=st.sampled_from([1, 3]),
    strides=st.lists(st.sampled_from([1, 2]), min_size=3, max_size=3),
    sizes=st.lists(st.integers(min_value=1, max_value=10), min_size=3, max_size=3),
)
def test_random_configurations(dims, alpha_in, alpha_out, spatiotemporal, kernel, strides, sizes):
    octave = "spatiotemporal" if dims == 3 and spatiotemporal else "spatial"
    layer = OctConv(dims, 16, 16, kernel, alpha_in, alpha_out, stride=tuple(strides[:dims]), octave=octave)
    assert_matches_reference(layer, tuple(sizes[:dims]), batch=1)


def test_odd_sizes_low_is_ceil_of_half_and_l2h_is_cropped():
    layer = OctConv3d(4, 4, 3, 0.5, 0.5, octave="spatiotemporal")
    high, low = make_input(layer, 1, (7, 13, 5))
    assert low.shape[2:] == (4, 7, 3)
    y = layer(Octave(high, low))
    assert y.high.shape[2:] == (7, 13, 5) and y.low.shape[2:] == (4, 7, 3)
    y2 = OctConv3d(4, 4, 3, 0.5, 0.5, stride=2, octave="spatiotemporal")(Octave(high, low))
    assert y2.high.shape[2:] == (4, 7, 3) and y2.low.shape[2:] == (2, 4, 2)


def test_spatial_mode_keeps_time_in_low_branch():
    layer = OctConv3d(4, 4, 3, 0.0, 0.5, octave="spatial")
    y = layer(torch.randn(1, 4, 5, 9, 9))
    assert y.low.shape[2:] == (5, 5, 5)
    y2 = OctConv3d(4, 4, 3, 0.5, 0.5, stride=(2, 2, 2), octave="spatial")(y)
    assert y2.high.shape[2:] == (3, 5, 5) and y2.low.shape[2:] == (3, 3, 3)


# ----------------------------------------------------------------------------- vanilla equivalence
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 4])
def test_alpha_zero_is_exactly_convnd(dims, stride, groups):
    conv_cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims]
    octave = OctConv(dims, 8, 12, 3, 0.0, 0.0, stride=stride, groups=groups, bias=True)
    vanilla = conv_cls(8, 12, 3, stride=stride, padding=1, groups=groups, bias=True)
    assert isinstance(octave.h2h, conv_cls)
    assert set(octave.state_dict()) == {"h2h.weight", "h2h.bias"}
    vanilla.load_state_dict({k.removeprefix("h2h."): v for k, v in octave.state_dict().items()})
    x = torch.randn(2, 8, *SIZES[dims])
    y = octave(x)
    assert isinstance(y, torch.Tensor)
    assert torch.equal(y, vanilla(x))


@pytest.mark.parametrize(("alpha_in", "alpha_out"), [(0.0, 0.5), (0.5, 0.5), (0.5, 0.0), (0.25, 0.75)])
def test_parameter_count_equals_vanilla_and_weights_partition(alpha_in, alpha_out):
    layer = OctConv2d(32, 64, 3, alpha_in, alpha_out)
    assert sum(p.numel() for p in layer.parameters()) == 64 * 32 * 9
    sd = layer.state_dict()
    assert sd["h2h.weight"].shape == (layer.out_high, layer.in_high, 3, 3)
    if alpha_out:
        assert sd["h2l.weight"].shape == (layer.out_low, layer.in_high, 3, 3)
    if alpha_in:
        assert sd["l2h.weight"].shape == (layer.out_high, layer.in_low, 3, 3)
    if alpha_in and alpha_out:
        assert sd["l2l.weight"].shape == (layer.out_low, layer.in_low, 3, 3)
    expected_paths = {"h2h"} | ({"h2l"} if alpha_out else set()) | ({"l2h"} if alpha_in else set())
    expected_paths |= {"l2l"} if alpha_in and alpha_out else set()
    assert {k.split(".")[0] for k in sd} == expected_paths


def test_bias_on_one_path_per_output_branch():
    assert {k for k in OctConv2d(8, 8, 3, 0.5, 0.5, bias=True).state_dict() if k.endswith("bias")} == {
        "h2h.bias",
        "l2l.bias",
    }
    # A first layer has no l2l: its low bias sits on h2l.
    first = OctConv2d(8, 8, 3, 0.0, 0.5, bias=True)
    assert {k for k in first.state_dict() if k.endswith("bias")} == {"h2h.bias", "h2l.bias"}
    assert {k for k in OctConv2d(8, 8, 3, 0.5, 0.0, bias=True).state_dict() if k.endswith("bias")} == {"h2h.bias"}


def test_gradients_reach_all_four_weights():
    for fast in (True, False):
        layer = OctConv3d(8, 8, 3, 0.5, 0.5, stride=(1, 2, 2), octave="spatiotemporal")
        layer.fast_path = fast
        high, low = make_input(layer, 2, (5, 9, 7))
        high.requires_grad_(True)
        low.requires_grad_(True)
        y = layer(Octave(high, low))
        (y.high.square().sum() + y.low.square().sum()).backward()
        for name in ("h2h", "h2l", "l2h", "l2l"):
            grad = getattr(layer, name).weight.grad
            assert grad is not None and grad.abs().sum() > 0, name
        assert high.grad.abs().sum() > 0 and low.grad.abs().sum() > 0


def test_fast_and_reference_gradients_agree():
    layer = OctConv2d(8, 8, 3, 0.5, 0.5, stride=2)
    high, low = make_input(layer, 2, (9, 11))
    grads = []
    for fast in (True, False):
        layer.zero_grad()
        layer.fast_path = fast
        y = layer(Octave(high, low))
        (y.high.sin().sum() + y.low.cos().sum()).backward()
        grads.append([getattr(layer, n).weight.grad.clone() for n in ("h2h", "h2l", "l2h", "l2l")])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- companions
def test_batchnorm_has_separate_statistics():
    bn = OctBatchNorm(3, 16, 0.25)
    assert bn.bn_h.num_features == 12 and bn.bn_l.num_features == 4
    x = Octave(torch.randn(2, 12, 3, 6, 6) * 3 + 1, torch.randn(2, 4, 3, 3, 3) - 5)
    y = bn(x)
    assert abs(float(y.high.mean().detach())) < 1e-5 and abs(float(y.low.mean().detach())) < 1e-5
    assert float(bn.bn_l.running_mean.mean()) < -0.4 < 0.05 < float(bn.bn_h.running_mean.mean())
    plain = OctBatchNorm(2, 8, 0.0)
    assert plain.bn_l is None and isinstance(plain(torch.randn(2, 8, 4, 4)), torch.Tensor)


def test_map_activation_dropout_and_add():
    x = Octave(torch.randn(2, 4, 6, 6), torch.randn(2, 4, 3, 3))
    y = OctReLU()(x)
    assert torch.equal(y.high, x.high.clamp_min(0)) and torch.equal(y.low, x.low.clamp_min(0))
    drop = OctDropout(0.5).eval()
    assert torch.equal(drop(x).high, x.high)
    gelu = OctMap(torch.nn.GELU())
    assert torch.allclose(gelu(x).low, F.gelu(x.low))
    summed = octave_add(x, x)
    assert torch.equal(summed.high, 2 * x.high) and torch.equal(summed.low, 2 * x.low)
    with pytest.raises(TypeError, match="both inputs"):
        octave_add(x, x.high)


@pytest.mark.parametrize("octave", ["spatial", "spatiotemporal"])
def test_pools_keep_the_octave_relation(octave):
    conv = OctConv3d(4, 8, 3, 0.0, 0.5, octave=octave)
    x = conv(torch.randn(1, 4, 7, 13, 11))
    y = OctMaxPool(3, (1, 3, 3), (1, 2, 2), (0, 1, 1), octave=octave)(x)
    assert y.high.shape[2:] == (7, 7, 6)
    assert y.low.shape[2:] == ((4 if octave == "spatiotemporal" else 7), 4, 3)
    t = OctMaxPool(3, (2, 1, 1), (2, 1, 1), octave=octave)(x)
    assert t.high.shape[2] == 3
    a = OctAvgPool(2, 2, 2)(Octave(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)))
    assert a.high.shape[2:] == (4, 4) and a.low.shape[2:] == (2, 2)
    with pytest.raises(ValueError, match="expected"):
        OctMaxPool(2, 3, 1, 0)(Octave(torch.randn(1, 2, 9, 9), torch.randn(1, 2, 5, 5)))


def test_global_pool_head_concatenates_branches():
    x = Octave(torch.ones(2, 6, 5, 5), torch.full((2, 2, 3, 3), 3.0))
    y = OctGlobalAvgPool()(x)
    assert y.shape == (2, 8)
    assert torch.equal(y[:, 6:], torch.full((2, 2), 3.0))
    assert OctGlobalAvgPool(flatten=False)(x).shape == (2, 8, 1, 1)


@pytest.mark.parametrize("octave", ["spatial", "spatiotemporal"])
def test_to_and_from_octave(octave):
    x = torch.randn(2, 8, 5, 9, 7)
    o = to_octave(x, 0.25, octave)
    assert o.high.shape == (2, 6, 5, 9, 7)
    assert o.low.shape == (2, 2, 3 if octave == "spatiotemporal" else 5, 5, 4)
    torch.testing.assert_close(o.low, ref_pool(x[:, 6:], (2 if octave == "spatiotemporal" else 1, 2, 2)))
    back = from_octave(o, octave)
    assert back.shape == x.shape
    assert torch.equal(back[:, :6], x[:, :6])
    assert from_octave(x) is x
    assert to_octave(x, 0.0).low is None


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(alpha_in=1.0), ValueError, "alpha_in must be in \\[0, 1\\)"),
        (dict(alpha_out=-0.1), ValueError, "alpha_out must be in \\[0, 1\\)"),
        (dict(octave="temporal"), ValueError, "octave must be one of"),
        (dict(kernel_size=2), ValueError, "kernel_size must be odd"),
        (dict(kernel_size=(3, 3)), TypeError, "kernel_size must be an int or a tuple of 3 ints"),
        (dict(stride=3), ValueError, "stride must be 1 or 2"),
        (dict(groups=3), ValueError, "groups=3 must divide every branch"),
        (dict(dims=4), ValueError, "dims must be 1, 2 or 3"),
        (dict(in_channels=0), ValueError, "in_channels must be a positive int"),
        (dict(in_channels=1, alpha_in=0.5), ValueError, "alpha_in=0.5 gives no low-frequency channels"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, error, match):
    args = dict(dims=3, in_channels=8, out_channels=8, kernel_size=3, alpha_in=0.5, alpha_out=0.5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        OctConv(**args)


def test_spatiotemporal_needs_3d():
    with pytest.raises(ValueError, match="only applies to 3D"):
        OctConv(2, 8, 8, 3, octave="spatiotemporal")


def test_depthwise_needs_equal_alphas():
    with pytest.raises(ValueError, match="alpha_in == alpha_out"):
        OctConv2d(8, 8, 3, 0.5, 0.25, groups=8)


def test_input_errors_name_what_was_expected():
    layer = OctConv2d(8, 8, 3, 0.5, 0.5)
    high, low = make_input(layer, 1, (8, 8))
    with pytest.raises(TypeError, match="needs an Octave\\(high, low\\) input"):
        layer(high)
    with pytest.raises(ValueError, match="expects 4 high-frequency input channels"):
        layer(Octave(torch.randn(1, 5, 8, 8), low))
    with pytest.raises(ValueError, match="expects 4 low-frequency input channels"):
        layer(Octave(high, torch.randn(1, 3, 4, 4)))
    with pytest.raises(ValueError, match="ceil of half"):
        layer(Octave(high, torch.randn(1, 4, 8, 8)))
    with pytest.raises(ValueError, match="expects a high tensor of shape \\(N, C, H, W\\)"):
        layer(Octave(torch.randn(4, 8, 8), low))
    with pytest.raises(TypeError, match=r"expects a torch\.Tensor, an Octave or a \(high, low\) pair"):
        layer([high, low, low])
    with pytest.raises(TypeError, match=r"expects a torch\.Tensor, an Octave or a \(high, low\) pair"):
        layer({"high": high})
    torch.testing.assert_close(layer([high, low]).high, layer(Octave(high, low)).high)  # any pair works
    first = OctConv2d(8, 8, 3, 0.0, 0.5)
    with pytest.raises(ValueError, match="takes no low branch"):
        first(Octave(torch.randn(1, 8, 8, 8), low))
    assert isinstance(first(Octave(torch.randn(1, 8, 8, 8), None)), Octave)
    with pytest.raises(ValueError, match="expects channels"):
        OctBatchNorm(2, 8, 0.5)(Octave(torch.randn(1, 6, 4, 4), torch.randn(1, 2, 2, 2)))


# ----------------------------------------------------------------------------- wrappers, dtypes, layouts
def test_dimension_wrappers():
    assert OctConv1d(4, 4, 3).dims == 1
    assert OctConv2d(4, 4, 3).dims == 2
    c3 = OctConv3d(4, 4, 3, octave="spatiotemporal")
    assert c3.dims == 3 and c3.axes == (True, True, True)
    assert OctConv3d(4, 4, 3).axes == (False, True, True)


def _small_net(dims: int, octave: str = "spatial") -> torch.nn.Sequential:
    return torch.nn.Sequential(
        OctConv(dims, 3, 16, 3, 0.0, 0.5, octave=octave),
        OctBatchNorm(dims, 16, 0.5),
        OctReLU(),
        OctConv(dims, 16, 16, 3, 0.5, 0.5, stride=2, octave=octave),
        OctBatchNorm(dims, 16, 0.5),
        OctReLU(),
        OctConv(dims, 16, 8, 1, 0.5, 0.0, octave=octave),
    ).eval()


@pytest.mark.parametrize(("dims", "fmt"), [(2, torch.channels_last), (3, torch.channels_last_3d)])
def test_channels_last_gives_same_values(dims, fmt):
    net = _small_net(dims)
    x = torch.randn(2, 3, *((5, 9, 11) if dims == 3 else (9, 11)))
    expected = net(x)
    net_cl = net.to(memory_format=fmt)
    y = net_cl(x.to(memory_format=fmt))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)


def test_bfloat16_close_to_float32():
    net = _small_net(3, "spatiotemporal")
    x = torch.randn(1, 3, 5, 9, 11)
    expected = net(x)
    y = net.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.05)


def test_torch_compile_fullgraph_without_graph_breaks():
    net = _small_net(3, "spatiotemporal")
    x = torch.randn(1, 3, 5, 9, 11)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), net(x), atol=1e-5, rtol=1e-4)


def test_torch_export():
    net = _small_net(2)
    x = torch.randn(1, 3, 9, 11)
    exported = torch.export.export(net, (x,))
    torch.testing.assert_close(exported.module()(x), net(x), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    net = _small_net(3, "spatiotemporal")
    x = torch.randn(2, 3, 5, 9, 11)
    expected = net(x)
    torch.testing.assert_close(net.cuda()(x.cuda()).cpu(), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("octave", ["spatial", "spatiotemporal"])
def test_pools_keep_the_octave_size_where_floor_mode_would_not(octave):
    # High 6 -> 3 in floor mode; its low map of 3 would floor to 1, the octave size is 2.
    high, low = torch.randn(1, 2, 6, 6, 6), torch.randn(1, 2, 3 if octave == "spatiotemporal" else 6, 3, 3)
    y = OctAvgPool(3, 2, 2, octave=octave)(Octave(high, low))
    assert y.high.shape[2:] == (3, 3, 3)
    assert y.low.shape[2:] == ((2 if octave == "spatiotemporal" else 3), 2, 2)
    # The low map's last window is the partial one: the mean of what it covers.
    torch.testing.assert_close(y.low[:, :, 0, -1, -1], low[:, :, :2, 2, 2].mean(dim=2))
    t = OctMaxPool(3, (2, 1, 1), (2, 1, 1), octave=octave)(Octave(high, low))
    assert t.high.shape[2] == 3 and t.low.shape[2] == (2 if octave == "spatiotemporal" else 3)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kernel", [1, 3])
def test_pool_first_vanilla_layer_pools_then_convolves_at_stride_1(dims, kernel):
    torch.manual_seed(0)
    layer = OctConv(dims, 6, 8, kernel, 0.0, 0.0, stride=2, pool_first=True)
    assert layer.h2h.stride == (1,) * dims and "pool_first=True" in repr(layer)
    x = torch.randn(2, 6, *(7, 10, 5)[:dims])  # odd sizes: ceil-mode pooling
    pooled = F.avg_pool1d if dims == 1 else F.avg_pool2d if dims == 2 else F.avg_pool3d
    expected = layer.h2h(pooled(x, 2, 2, ceil_mode=True, count_include_pad=False))
    assert torch.equal(layer(x), expected)
    strided = OctConv(dims, 6, 8, kernel, 0.0, 0.0, stride=2)
    strided.load_state_dict(layer.state_dict())  # same keys and shapes either way
    assert strided(x).shape == expected.shape and not torch.allclose(strided(x), expected)


def test_pool_first_must_be_a_bool():
    with pytest.raises(TypeError, match="pool_first"):
        OctConv(2, 4, 4, 3, 0.0, 0.0, stride=2, pool_first="yes")


def test_path_changed_after_construction_takes_the_reference_formula():
    """A path conv whose padding mode or padding was changed no longer matches the layer's own
    settings; the fast path (which reads the layer's) steps aside, in training and in eval."""
    torch.manual_seed(0)
    for alpha in (0.0, 0.5):
        conv = OctConv2d(8, 8, 3, alpha, alpha)
        conv.h2h.padding_mode = "circular"
        x = torch.randn(1, 8, 8, 8)
        x = x if alpha == 0 else to_octave(x, alpha)
        outs = []
        for mode in (True, False):
            conv.train(mode)
            with torch.no_grad():
                out = conv(x)
            outs.append(out if isinstance(out, torch.Tensor) else out.high)
        torch.testing.assert_close(outs[0], outs[1])
        conv.eval()
        with torch.no_grad():
            expected = conv.forward_reference(x)
        torch.testing.assert_close(outs[1], expected if isinstance(expected, torch.Tensor) else expected.high)


def test_plain_tensor_for_an_octave_layer_gets_the_to_octave_hint_whatever_its_channels():
    conv = OctConv3d(64, 64, 3, 0.5, 0.5)
    with pytest.raises(TypeError, match=r"needs an Octave\(high, low\) input.*to_octave"):
        conv(torch.randn(1, 64, 3, 6, 6))  # all 64 channels, not the 32 high ones


def test_high_and_low_of_other_dtypes_or_devices_are_named():
    conv = OctConv2d(16, 16, 3)
    with pytest.raises(ValueError, match=r"high torch\.float32 on cpu and low torch\.float64 on cpu"):
        conv(Octave(torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"low torch\.float32 on meta"):
        conv(Octave(torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4, device="meta")))


def test_an_input_of_another_dtype_than_the_weights_is_named_at_the_layer():
    conv = OctConv3d(1, 16, 3, 0.0, 0.5)
    for x in (torch.randn(1, 1, 4, 8, 8, dtype=torch.float64), torch.zeros(1, 1, 4, 8, 8, dtype=torch.long)):
        with pytest.raises(TypeError, match=rf"OctConv3d has torch\.float32 weights on cpu and got a {x.dtype} input"):
            conv(x)
    assert conv.double()(torch.randn(1, 1, 4, 8, 8, dtype=torch.float64)).high.dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts per path: not a mismatch
        assert conv.float()(torch.randn(1, 1, 4, 8, 8).bfloat16()).high.dtype == torch.bfloat16


def test_every_layer_takes_a_plain_high_low_pair():
    high, low = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)
    reference = Octave(high, low)
    for layer in (OctBatchNorm2d(16).eval(), OctReLU(), OctMaxPool(2, 2, 2), OctAvgPool(2, 2, 2)):
        for pair in ((high, low), [high, low]):
            out, expected = layer(pair), layer(reference)
            torch.testing.assert_close(out.high, expected.high)
            torch.testing.assert_close(out.low, expected.low)
    torch.testing.assert_close(OctGlobalAvgPool()((high, low)), OctGlobalAvgPool()(reference))
    torch.testing.assert_close(octave_add((high, low), [high, low]).low, 2 * low)
    torch.testing.assert_close(map_octave(torch.neg, (high, low)).high, -high)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_jit_trace_passes_its_own_check(mode):
    """torch.jit.trace re-traces to check the graph: the L->H add and the cat plan must not depend on grad mode."""
    import warnings

    conv = getattr(OctConv2d(16, 16, 3, bias=True), mode)()
    x = Octave(torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(conv, (x,))  # check_trace=True (the default) raised TracingCheckError
    for got, expected in zip(traced(x), conv(x)):
        torch.testing.assert_close(got, expected)


def test_a_traced_strided_layer_is_right_at_odd_sizes_too():
    """The pooled-twice shortcut (exact for even sizes only) is a Python branch a trace would freeze."""
    import warnings

    conv = OctConv2d(8, 8, 3, 0.5, 0.5, stride=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(conv, ((torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8, 8)),))
    x = (torch.randn(1, 4, 15, 13), torch.randn(1, 4, 8, 7))
    for got, expected in zip(traced(x), conv(x)):
        torch.testing.assert_close(got, expected)


def test_numpy_scalars_are_taken_like_nn_conv_and_bad_values_are_named():
    import numpy as np

    from oct3d.nn import split_channels
    from oct3d.nn.kernels import force

    conv = OctConv2d(np.int64(16), 16, np.int64(3), alpha_in=np.float32(0.5))
    assert (conv.in_channels, conv.kernel_size, conv.alpha_in) == (16, (3, 3), 0.5)
    assert type(conv.in_channels) is int
    with pytest.raises(ValueError, match="alpha must be a float in"):
        split_channels(16, 1.5)
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3, got True"):
        OctConv(True, 16, 16, 3)
    with pytest.raises(ValueError, match="at least 4 channels"):  # floor(0.3 * 4) = 1: four is the fewest
        OctConv2d(3, 16, 3, alpha_in=0.3)
    for bad in ({"stride": 0}, {"kernel_size": 0}, {"padding": -1}):
        args = {"kernel_size": 2, "stride": 2, "padding": 0, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            OctMaxPool(2, **args)
    with pytest.raises(ValueError, match="force takes layer plans"), force(lwo="split"):
        pass
    with pytest.raises(ValueError, match="force takes layer plans"), force(low="bogus"):
        pass


def test_pools_check_their_inputs_and_keep_the_memory_format():
    from oct3d.nn import OctAvgPool, OctMaxPool

    with pytest.raises(ValueError, match=r"OctMaxPool\(dims=3\) expects input maps of shape \(N, C, T, H, W\)"):
        OctMaxPool(3, 2, 1)(torch.randn(2, 4, 16, 16))  # reads like nn.MaxPool2d(3, 2, 1); it is not
    with pytest.raises(ValueError, match="expects low maps of shape"):
        OctMaxPool(2, 2)(Octave(torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8)))
    with pytest.raises(ValueError, match=r"high tensor shaped \(1, 4, 16, 16\) to be shaped \(1, 4, 8, 8\)"):
        OctMaxPool(2, 2)(Octave(torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)))  # was pooled and cropped
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3"):
        OctMaxPool(4, 2)
    with pytest.raises(ValueError, match="expects input maps"):
        OctMaxPool(2, 2)(torch.randn(3, 8, 8))  # unbatched: refused, it reads like a batched 1D map
    x = Octave(torch.randn(1, 4, 15, 13), torch.randn(1, 4, 8, 7))
    for fixed, generic in ((OctMaxPool2d(3, 2, 1), OctMaxPool(2, 3, 2, 1)), (OctAvgPool3d(2), OctAvgPool(3, 2))):
        sample = x if fixed.dims == 2 else Octave(torch.randn(1, 4, 6, 15, 13), torch.randn(1, 4, 6, 8, 7))
        for got, want in zip(fixed(sample), generic(sample)):
            assert torch.equal(got, want)
    layout = torch.channels_last_3d
    volume = Octave(torch.randn(1, 8, 6, 15, 13).contiguous(memory_format=layout),
                    torch.randn(1, 8, 6, 8, 7).contiguous(memory_format=layout))
    for pool in (OctAvgPool3d(2), OctAvgPool3d(3, 2, 1), OctMaxPool(3, 3, 2, 1)):
        out = pool(volume)
        assert all(t.is_contiguous(memory_format=layout) for t in out), pool  # avg_pool3d returned channels-first
        assert tuple(out.low.shape[2:]) == (out.high.shape[2], *(-(-n // 2) for n in out.high.shape[3:]))


def test_torch_func_model_ensembling_and_vmap_over_cropped_maps():
    """torch.func's stack_module_state recipe (batched weights, no autograd) and vmap over non-contiguous
    maps: the CPU kernel routing stays out of functorch transforms."""
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    from oct3d.nn import OctGlobalAvgPool, OctMaxPool2d

    torch.manual_seed(0)

    def make() -> torch.nn.Module:
        return torch.nn.Sequential(OctConv2d(3, 8, 3, 0.0, 0.5), OctMaxPool2d(3, 2, 1), OctConv2d(8, 8, 3, 0.5, 0.5),
                                   OctGlobalAvgPool(), torch.nn.Linear(8, 2)).eval()

    models = [make() for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(4, 3, 15, 15)
    with torch.no_grad():
        out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
        for model, got in zip(models, out):
            torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
    conv = OctConv2d(8, 8, 3, 0.5, 0.5, stride=2).eval()
    high, low = torch.randn(4, 1, 4, 9, 9)[..., :8, :8], torch.randn(4, 1, 4, 4, 4)  # per-sample crops
    with torch.no_grad():
        batched = vmap(lambda h, lo: tuple(conv(Octave(h, lo))))(high, low)
        for i in range(4):
            for got, want in zip(batched, conv(Octave(high[i], low[i]))):
                torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_constructor_takes_nn_conv_style_padding_device_and_dtype_and_refuses_what_cannot_work():
    from oct3d.nn import OctBatchNorm2d, OctGlobalAvgPool

    conv = OctConv2d(8, 8, 3, padding=1, device="meta", dtype=torch.float64)  # as nn.Conv2d(..., padding=1) code
    assert conv.h2h.weight.device.type == "meta" and conv.l2l.weight.dtype == torch.float64
    assert OctConv3d(8, 8, 3, padding="same", dilation=2).padding == (2, 2, 2)
    torch.nn.utils.skip_init(OctConv2d, 8, 8, 3)
    for kwargs, error, match in (
        ({"padding": 0}, ValueError, r"padding must be 'same' \(\(1, 1\)"),
        ({"padding": "valid"}, ValueError, "stay aligned"),
        ({"bias": "yes"}, TypeError, "bias must be a bool"),
        ({"padding": "valid"}, ValueError, "stay aligned"),
        ({"alpha_in": 0.9999999}, ValueError, "leaves no high-frequency channel out of 8"),
    ):
        with pytest.raises(error, match=match):
            OctConv2d(8, 8, 3, **kwargs)
    assert OctBatchNorm2d(8, 0.5, bias=False).bn_h.bias is None
    shapes = OctConv2d(8, 8, 3, 0.0, 0.5)(torch.randn(1, 8, 16, 16, device="meta"))  # as nn.Conv2d: shapes only
    assert shapes.high.device.type == "meta" and tuple(shapes.low.shape) == (1, 4, 8, 8)
    assert OctConv2d(8, 8, 1, padding="valid", bias=1).h2h.bias is not None  # as nn.Conv2d takes them
    with pytest.raises(TypeError, match="flatten must be a bool"):
        OctGlobalAvgPool(flatten="no")


@pytest.mark.parametrize(("alpha_in", "alpha_out", "groups"), [(0.5, 0.5, 1), (0.0, 0.5, 1), (0.25, 0.75, 2)])
def test_paths_start_with_the_vanilla_layers_initialisation(alpha_in, alpha_out, groups):
    """Every path is uniform with nn.ConvNd's bound for the whole layer, not for its own slice."""
    torch.manual_seed(0)
    conv = OctConv2d(64, 64, 3, alpha_in, alpha_out, groups=groups, bias=True)
    bound = 1 / math.sqrt(64 // groups * 9)
    for path in (conv.h2h, conv.h2l, conv.l2h, conv.l2l):
        if path is not None:
            assert 0.95 * bound < path.weight.abs().max() <= bound
            assert path.bias is None or path.bias.abs().max() <= bound
    x = torch.randn(32, 64, 12, 12)
    vanilla = torch.nn.Conv2d(64, 64, 3, padding=1, groups=groups)
    with torch.no_grad():
        high = conv(Octave(x[:, :conv.in_high], x[:, conv.in_high:, ::2, ::2]) if conv.in_low else x).high
        assert 0.8 < high.var() / vanilla(x).var() < 1.25


def test_octave_loads_with_weights_only(tmp_path):
    """A saved Octave (a feature cache, an example input) loads under torch.load(weights_only=True)."""
    saved = {"features": Octave(torch.randn(1, 4, 6, 6), torch.randn(1, 4, 3, 3)), "plain": Octave(torch.randn(2))}
    torch.save(saved, tmp_path / "octave.pt")
    loaded = torch.load(tmp_path / "octave.pt", weights_only=True)
    assert isinstance(loaded["features"], Octave) and loaded["plain"].low is None
    assert torch.equal(loaded["features"].low, saved["features"].low)


@pytest.mark.parametrize(
    ("octave_pool", "vanilla_pool"),
    [
        (lambda: OctMaxPool2d(3, 2, 1, 2, False, True), lambda: nn.MaxPool2d(3, 2, 1, 2, False, True)),
        (lambda: OctMaxPool1d(3, 2, 1, ceil_mode=True), lambda: nn.MaxPool1d(3, 2, 1, ceil_mode=True)),
        (lambda: OctAvgPool2d(3, 2, 1, True, False), lambda: nn.AvgPool2d(3, 2, 1, True, False)),
        (lambda: OctAvgPool2d(2, divisor_override=3), lambda: nn.AvgPool2d(2, divisor_override=3)),
        (lambda: OctAvgPool1d(3, 2, 1, False, False), lambda: nn.AvgPool1d(3, 2, 1, False, False)),
        (lambda: OctMaxPool3d(3, 2, 1, 1, False, True, octave="spatiotemporal"),
         lambda: nn.MaxPool3d(3, 2, 1, 1, False, True)),
        (lambda: OctAvgPool3d(3, 2, 1, False, False, None, octave="spatial"),
         lambda: nn.AvgPool3d(3, 2, 1, False, False)),
    ],
)
def test_pools_take_the_vanilla_pools_arguments(octave_pool, vanilla_pool):
    """Positional and keyword arguments as nn.MaxPoolNd / nn.AvgPoolNd; the high map (or a plain tensor)
    pools exactly as the vanilla layer, and the low map stays its octave."""
    pool, vanilla = octave_pool(), vanilla_pool()
    dims = pool.dims
    torch.manual_seed(0)
    high = torch.randn(2, 4, *(7, 9, 11)[:dims])
    torch.testing.assert_close(pool(high), vanilla(high), rtol=0, atol=0)
    low = torch.randn(2, 4, *low_size(high.shape[2:], pool.factors))
    out = pool(Octave(high, low))
    torch.testing.assert_close(out.high, vanilla(high), rtol=0, atol=0)
    assert tuple(out.low.shape[2:]) == low_size(out.high.shape[2:], pool.factors)
    assert repr(pool).startswith(f"{type(pool).__name__}(kernel_size=")
    assert (f"octave={pool.octave!r}" in repr(pool)) == (dims == 3)


def test_pool_argument_errors():
    with pytest.raises(ValueError, match="return_indices=True is not supported"):
        OctMaxPool2d(3, 2, 1, 1, True)
    with pytest.raises(TypeError, match="ceil_mode must be a bool"):
        OctAvgPool2d(2, ceil_mode="yes")
    with pytest.raises(ValueError, match="divisor_override must be a positive int"):
        OctAvgPool3d(2, divisor_override=0)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        OctMaxPool2d(3, dilation=0)
    with pytest.raises(TypeError):
        OctMaxPool3d(3, 2, 1, "spatiotemporal")  # the 4th positional is dilation, as in nn.MaxPool3d


def test_bad_octave_pairs_get_errors_that_name_the_layer():
    from oct3d.nn import OctConvTranspose2d, split_channels

    a = Octave(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="octave_add needs equal branch shapes"):
        octave_add(a, Octave(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 3, 3)))
    with pytest.raises(TypeError, match=r"octave_add's a must be a torch\.Tensor"):
        octave_add(None, None)
    with pytest.raises(TypeError, match="only a has one"):
        octave_add(a, torch.randn(1, 4, 8, 8))
    torch.testing.assert_close(octave_add((a.high, a.low), a).low, 2 * a.low)
    with pytest.raises(ValueError, match="batch size, dtype and device"):
        from_octave(Octave(torch.randn(1, 4, 8, 8), torch.randn(2, 4, 4, 4)))
    assert from_octave((a.high, a.low)).shape == (1, 8, 8, 8)  # a plain pair, as every layer takes
    with pytest.raises(ValueError, match="one device with one dtype"):
        OctConvTranspose2d(8, 8, 2, stride=2)(Octave(torch.randn(1, 4, 4, 4), torch.randn(1, 4, 2, 2).double()))
    with pytest.raises(TypeError, match=r"got a plain tensor of shape \(1, 8, 4, 4\)"):
        OctConvTranspose2d(8, 8, 2, stride=2)(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="OctBatchNorm2d expects the low tensor"):
        OctBatchNorm2d(8)(Octave(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)))
    bn3 = OctBatchNorm(3, 8)  # no octave setting: either 3D mode's low size
    bn3(Octave(torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 4, 4)))
    bn3(Octave(torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 2, 4, 4)))
    with pytest.raises(ValueError, match="takes no low branch"):
        OctConv2d(3, 8, 3, 0.0, 0.5)(a)  # named for the cause, although the channels differ too
    with pytest.raises(ValueError, match="channels must be an int >= 0"):
        split_channels(-8, 0.5)
    with pytest.raises(ValueError, match="at least one spatial axis"):
        OctGlobalAvgPool()(torch.randn(2, 3))


def test_transposed_low_output_is_dense_in_the_input_layout():
    from oct3d.nn import OctConvTranspose3d

    layer = OctConvTranspose3d(8, 8, 3, stride=2, padding=1, output_padding=1)
    high = torch.randn(1, 4, 3, 5, 5).contiguous(memory_format=torch.channels_last_3d)
    low = torch.randn(1, 4, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    out = layer(Octave(high, low))
    assert out.low.shape[2:] == (6, 5, 5)
    assert out.low.is_contiguous(memory_format=torch.channels_last_3d)


def test_octave_add_traces_under_fx():
    """Symbolic tracing passes Proxies, whose shapes the input checks cannot read."""

    class Residual(nn.Module):
        def forward(self, high, low):
            return octave_add(Octave(high, low), Octave(high, low))

    graph = torch.fx.symbolic_trace(Residual())
    high, low = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)
    out = graph(high, low)
    torch.testing.assert_close(out.high, 2 * high)
    torch.testing.assert_close(out.low, 2 * low)


def test_pool_windows_larger_than_the_low_map_are_named():
    with pytest.raises(ValueError, match=r"OctMaxPool2d\(.*dilation=\(2, 2\)\) cannot pool the high map"):
        OctMaxPool2d(3, 1, 0, 2)(Octave(torch.randn(1, 2, 6, 6), torch.randn(1, 2, 3, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_weights_are_cacheable():
    from oct3d.nn import kernels

    assert kernels.cacheable(torch.randn(2, device="cuda"))  # Tensor.is_shared() is True for any CUDA tensor


def test_conv_repr_reads_like_the_constructor():
    assert OctConv2d(8, 16, 3, 0.5, 0.25, stride=2, groups=2, bias=True).extra_repr() == (
        "8, 16, kernel_size=(3, 3), alpha_in=0.5, alpha_out=0.25, stride=(2, 2), groups=2, bias=True"
    )
    generic = OctConv(3, 8, 8, 3, octave="spatiotemporal", dilation=2).extra_repr()
    assert generic == ("3, 8, 8, kernel_size=(3, 3, 3), alpha_in=0.5, alpha_out=0.5, stride=(1, 1, 1), "
                       "dilation=(2, 2, 2), octave='spatiotemporal'")


def test_octave_layers_name_a_broken_high_low_pair():
    high, low = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 2, 2)
    mixed = Octave(high, low.double())
    for layer in (OctBatchNorm2d(8), OctMaxPool2d(2), OctGlobalAvgPool(), OctReLU()):
        with pytest.raises(ValueError, match=f"{type(layer).__name__}.*one dtype.*float64"):
            layer(mixed)
    with pytest.raises(ValueError, match=r"OctReLU expects the low tensor.*\(3, 4, 9, 9\)"):
        OctReLU()(Octave(torch.randn(2, 4, 8, 8), torch.randn(3, 4, 9, 9)))
    with pytest.raises(TypeError, match=r"OctBatchNorm2d expects floating-point maps, got torch\.int64"):
        OctBatchNorm2d(8)(Octave(high.long(), low.long()))
    with pytest.raises(ValueError, match=r"OctInstanceNorm2d.*the low map has size \(1, 1\)"):
        OctInstanceNorm(2, 8, 0.5)(Octave(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 1, 1)))
    with pytest.raises(ValueError, match="the low map"):  # eval mode too: no running statistics to use
        OctInstanceNorm(2, 8, 0.5).eval()(Octave(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 1, 1)))


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, "float32"])
def test_layers_refuse_a_non_float_weight_dtype_at_construction(dtype):
    for make in (lambda: OctConv2d(8, 8, 3, dtype=dtype), lambda: OctConvTranspose2d(8, 8, 2, stride=2, dtype=dtype)):
        with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype"):
            make()
    assert OctConv2d(8, 8, 3, pool_first=1).pool_first is True  # bools as nn layers take them, like bias


def test_pool_misaligns_names_the_sizes_where_a_window_cannot_keep_the_octave():
    from oct3d.nn.layers import pool_misaligns

    assert pool_misaligns((3, 3), (2, 2), (0, 0), (1, 1), True, (2, 2)) == 6  # 2 modulo 4
    for kernel, stride, padding, ceil_mode in (((2, 2), (2, 2), (0, 0), False), ((3, 3), (2, 2), (1, 1), False),
                                               ((2, 2), (2, 2), (0, 0), True), ((3, 3), (1, 1), (1, 1), False)):
        assert pool_misaligns(kernel, stride, padding, (1, 1), ceil_mode, (2, 2)) is None
    assert pool_misaligns((3, 3), (2, 2), (0, 0), (1, 1), True, (1, 1)) is None  # no octave axis
    with pytest.raises(ValueError, match="pools the high map"):
        OctMaxPool2d(3, 2, 0, ceil_mode=True)(Octave(torch.randn(1, 2, 6, 6), torch.randn(1, 2, 3, 3)))
