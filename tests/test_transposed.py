"""OctConvTranspose: the formula of its docstring, alpha 0 as nn.ConvTransposeNd, its argument and input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oct3d.nn import Octave, OctConvTranspose, OctConvTranspose1d, OctConvTranspose2d, OctConvTranspose3d


def _pool(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[x.dim() - 3]
    return pool(x, factors, factors, ceil_mode=True, count_include_pad=False)


def _reference(layer: OctConvTranspose, high: torch.Tensor, low: torch.Tensor | None):
    """The docstring's formula, written out: nearest upsampling then crop; pool before H->L."""
    y_high = layer.h2h(high)
    if layer.l2h is not None:
        up = layer.l2h(low)
        for axis, f in enumerate(layer.factors):
            up = up.repeat_interleave(f, dim=2 + axis)
        y_high = y_high + up[(slice(None), slice(None), *(slice(0, n) for n in y_high.shape[2:]))]
    if layer.h2l is None:
        return y_high, None
    y_low = layer.h2l(_pool(high, layer.factors))
    if layer.l2l is not None:
        y_low = y_low + layer.l2l(low)
    size = [-(-n // f) for n, f in zip(y_high.shape[2:], layer.factors)]
    return y_high, y_low[(slice(None), slice(None), *(slice(0, n) for n in size))]


CASES = [  # dims, kernel, stride, padding, output_padding, octave, high size
    (2, 2, 2, 0, 0, "spatial", (7, 6)),
    (2, 3, 2, 1, 1, "spatial", (5, 8)),
    (2, 3, 1, 1, 0, "spatial", (9, 7)),
    (1, 4, 2, 1, 0, "spatial", (11,)),
    (3, 2, 2, 0, 0, "spatial", (3, 5, 6)),
    (3, (1, 2, 2), (1, 2, 2), 0, 0, "spatiotemporal", (4, 5, 5)),
]


@pytest.mark.parametrize(("dims", "kernel", "stride", "padding", "output_padding", "octave", "size"), CASES)
@pytest.mark.parametrize(("alpha_in", "alpha_out"), [(0.5, 0.5), (0.0, 0.5), (0.5, 0.0), (0.25, 0.75)])
def test_values_and_gradients_follow_the_formula(dims, kernel, stride, padding, output_padding, octave, size,
                                                 alpha_in, alpha_out):
    torch.manual_seed(0)
    layer = OctConvTranspose(dims, 8, 8, kernel, alpha_in, alpha_out, stride, padding, output_padding, bias=True,
                             octave=octave).double()
    factors = layer.factors
    high = torch.randn(2, layer.in_high, *size, dtype=torch.float64, requires_grad=True)
    low = None
    if layer.in_low:
        low_shape = [-(-n // f) for n, f in zip(size, factors)]
        low = torch.randn(2, layer.in_low, *low_shape, dtype=torch.float64, requires_grad=True)
    out = layer(Octave(high, low) if low is not None else high)
    got = (out.high, out.low) if isinstance(out, Octave) else (out, None)
    want = _reference(layer, high, low)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w)
    if got[1] is not None:  # the low output is the octave of the high output
        assert list(got[1].shape[2:]) == [-(-n // f) for n, f in zip(got[0].shape[2:], factors)]
    outputs = [t for t in got if t is not None]
    cotangents = [torch.randn_like(t) for t in outputs]
    wrt = [t for t in (high, low) if t is not None] + list(layer.parameters())
    grads = torch.autograd.grad(outputs, wrt, cotangents)
    ref_grads = torch.autograd.grad([t for t in want if t is not None], wrt, cotangents)
    for g, w in zip(grads, ref_grads):
        torch.testing.assert_close(g, w)


def test_alpha_zero_is_the_vanilla_layer_and_the_fixed_dims_classes_match():
    torch.manual_seed(0)
    layer = OctConvTranspose2d(6, 4, 3, 0.0, 0.0, stride=2, padding=1, output_padding=1, bias=True)
    vanilla = nn.ConvTranspose2d(6, 4, 3, 2, 1, 1, bias=True)
    vanilla.load_state_dict({k.removeprefix("h2h."): v for k, v in layer.state_dict().items()})
    x = torch.randn(2, 6, 7, 9)
    torch.testing.assert_close(layer(x), vanilla(x), rtol=0, atol=0)
    for fixed, dims in ((OctConvTranspose1d(8, 8, 2, stride=2), 1), (OctConvTranspose3d(8, 8, 2, stride=2), 3)):
        assert fixed.dims == dims and isinstance(fixed, OctConvTranspose)


def test_bad_arguments_and_inputs_are_named():
    for kwargs, match in (
        ({"kernel_size": 0}, "kernel_size must be >= 1"),
        ({"kernel_size": 2, "stride": 0}, "stride must be >= 1"),
        ({"kernel_size": 3, "stride": 2, "padding": -1}, "padding must be >= 0"),
        ({"kernel_size": 2, "stride": 2, "output_padding": 2}, "output_padding must be smaller than stride"),
        ({"kernel_size": 3, "stride": 2, "padding": 1}, "the low branch would come out smaller"),
    ):
        with pytest.raises(ValueError, match=match):
            OctConvTranspose2d(8, 8, **kwargs)
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3"):
        OctConvTranspose(4, 8, 8, 2)
    layer = OctConvTranspose2d(8, 8, 2, stride=2)
    good = (torch.randn(1, 4, 9, 9), torch.randn(1, 4, 5, 5))
    assert isinstance(layer(list(good)), Octave)  # a (high, low) pair, as OctConv takes
    for bad, error, match in (
        ((torch.randn(1, 5, 9, 9), good[1]), ValueError, r"high tensor of shape \(N, 4, H, W\)"),
        ((good[0], torch.randn(1, 4, 10, 10)), ValueError, r"to be shaped \(1, 4, 5, 5\)"),
        ((good[0].double(), good[1].double()), TypeError, "float32 weights"),
        ((torch.randn(1, 4, 3, 9, 9), torch.randn(1, 4, 3, 5, 5)), ValueError, "high tensor of shape"),
        (good[0], TypeError, "needs an Octave\\(high, low\\) input with a low tensor"),
        ("x", TypeError, "expects a torch.Tensor"),
    ):
        with pytest.raises(error, match=match):
            layer(bad)


def test_autocast_inputs_are_cast_by_the_paths():
    layer = OctConvTranspose2d(8, 8, 2, stride=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer((torch.randn(1, 4, 9, 9).bfloat16(), torch.randn(1, 4, 5, 5).bfloat16()))
    assert out.high.dtype == torch.bfloat16 and out.high.shape == (1, 4, 18, 18)


@pytest.mark.parametrize(("alpha_in", "alpha_out"), [(0.5, 0.5), (0.0, 0.5), (0.25, 0.75)])
def test_paths_start_with_the_vanilla_transposed_layers_initialisation(alpha_in, alpha_out):
    """Every path is uniform with nn.ConvTranspose2d's bound for the whole layer, not for its own slice."""
    torch.manual_seed(0)
    layer = OctConvTranspose2d(64, 64, 2, alpha_in, alpha_out, stride=2, bias=True)
    vanilla = nn.ConvTranspose2d(64, 64, 2, stride=2)
    bound = vanilla.weight.abs().max().item()
    for path in (layer.h2h, layer.h2l, layer.l2h, layer.l2l):
        if path is not None:
            assert 0.95 * bound < path.weight.abs().max() <= 1.01 * bound
            assert path.bias is None or path.bias.abs().max() <= 1.01 * bound
    x = torch.randn(32, 64, 8, 8)
    with torch.no_grad():
        octave_in = Octave(x[:, :layer.in_high], x[:, layer.in_high:, ::2, ::2]) if layer.in_low else x
        assert 0.8 < layer(octave_in).high.var() / vanilla(x).var() < 1.25


def test_repr_reads_like_the_constructor():
    assert OctConvTranspose2d(8, 8, 2, stride=2, bias=True).extra_repr() == (
        "8, 8, kernel_size=(2, 2), alpha_in=0.5, alpha_out=0.5, stride=(2, 2), padding=(0, 0), "
        "output_padding=(0, 0), bias=True"
    )
    assert OctConvTranspose(3, 8, 8, 2, stride=2).extra_repr().startswith("3, 8, 8, ")
