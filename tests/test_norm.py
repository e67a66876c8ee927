"""oct3d.nn.norm.batch_norm must be nn.BatchNorm*d, for the narrow channels_last maps it takes over."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from oct3d.nn import norm


@pytest.mark.parametrize(("dims", "channels", "size"), [(3, 8, (4, 6, 8)), (3, 3, (5, 6, 7)), (2, 4, (6, 10)),
                                                        (3, 1, (4, 4, 4))])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_wide_batch_norm_equals_pytorch(dims, channels, size, momentum, affine):
    torch.manual_seed(0)
    bn = (nn.BatchNorm2d, nn.BatchNorm3d)[dims - 2](channels, momentum=momentum, affine=affine).double()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
    ref_bn = copy.deepcopy(bn)
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = (torch.randn(2, channels, *size, dtype=torch.float64) * 3 + 5).contiguous(memory_format=layout)
    if channels == 1:
        x = x.as_strided(x.shape, (x.stride(0), 1, *x.stride()[2:]))
    assert norm._rows_per_wide_row(bn, x) is not None  # the case under test takes the wide path
    g = torch.randn(x.shape, dtype=torch.float64)
    for _ in range(2):  # two steps: running statistics and the cumulative average
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref = norm.batch_norm(bn, a), ref_bn(b)
        torch.testing.assert_close(out, ref)
        assert norm.is_channels_last(out)
        params, ref_params = list(bn.parameters()), list(ref_bn.parameters())
        got = torch.autograd.grad(out, [a, *params], g)
        want = torch.autograd.grad(ref, [b, *ref_params], g)
        for p, q in zip(got, want):
            torch.testing.assert_close(p, q)
        assert norm.is_channels_last(got[0])
        torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
        torch.testing.assert_close(bn.running_var, ref_bn.running_var)
        assert bn.num_batches_tracked == ref_bn.num_batches_tracked
    bn.eval()
    ref_bn.eval()
    torch.testing.assert_close(norm.batch_norm(bn, x), ref_bn(x))


def test_pytorch_path_where_wide_rows_do_not_apply():
    bn = nn.BatchNorm3d(8)
    channels_first = torch.randn(2, 8, 4, 4, 4)
    wide = torch.randn(2, 16, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    narrow = torch.randn(2, 8, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    assert norm._rows_per_wide_row(bn, channels_first) is None
    assert norm._rows_per_wide_row(nn.BatchNorm3d(16), wide) is None
    assert norm._rows_per_wide_row(bn, narrow.half()) is None
    with torch.autocast("cpu", torch.bfloat16):
        assert norm._rows_per_wide_row(bn, narrow) is None
    calls = []
    bn.register_forward_hook(lambda *a: calls.append(1))
    assert norm._rows_per_wide_row(bn, narrow) is None  # a hooked module is called as itself
    norm.batch_norm(bn, narrow)
    assert calls == [1]
    backward_hooked = nn.BatchNorm3d(8)
    grads = []
    backward_hooked.register_full_backward_hook(lambda *a: grads.append(1))
    assert norm._rows_per_wide_row(backward_hooked, narrow) is None
    norm.batch_norm(backward_hooked, narrow.requires_grad_()).sum().backward()
    assert grads == [1]
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert norm._rows_per_wide_row(nn.BatchNorm3d(8), narrow) is None  # a global hook sees every call
    finally:
        handle.remove()
    assert norm._rows_per_wide_row(nn.BatchNorm3d(8), narrow) is not None


def test_training_needs_more_than_one_value_per_channel():
    bn = nn.BatchNorm2d(4)
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        norm.batch_norm(bn, x)


def test_output_takes_an_in_place_relu():
    bn = nn.BatchNorm3d(8)
    x = torch.randn(2, 8, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    torch.relu_(norm.batch_norm(bn, x)).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("affine", [True, False])
def test_double_backward_through_the_wide_path(affine):
    """Gradient penalties (create_graph=True) differentiate the backward, as through nn.BatchNorm."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, affine=affine).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert norm._rows_per_wide_row(bn, x) is not None
    ref_bn = copy.deepcopy(bn)

    def penalty(module, fn):
        a = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad((fn(module, a) ** 3).sum(), a, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), [a, *module.parameters()])

    for got, want in zip(penalty(bn, norm.batch_norm), penalty(ref_bn, lambda m, a: m(a))):
        torch.testing.assert_close(got, want)
    torch.autograd.gradgradcheck(lambda a: norm.batch_norm(bn, a), (x.clone().requires_grad_(),))


def test_eval_batch_norm_equals_the_module_and_keeps_its_hooks():
    """In eval mode a stock BatchNorm is applied functionally (no module call): the same values;
    a hooked module, a subclass and a module without running statistics are still called."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(32).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    x = torch.randn(2, 32, 5, 7).contiguous(memory_format=torch.channels_last)
    out = norm.batch_norm(bn, x)
    torch.testing.assert_close(out, bn(x), rtol=0, atol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    seen = []
    handle = bn.register_forward_hook(lambda module, args, output: seen.append(module))
    norm.batch_norm(bn, x)
    handle.remove()
    global_handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: seen.append(module))
    norm.batch_norm(bn, x)
    global_handle.remove()
    assert seen == [bn, bn]

    class Shifted(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + 1

    shifted = Shifted(32).eval()
    torch.testing.assert_close(norm.batch_norm(shifted, x), shifted(x))
    untracked = nn.BatchNorm2d(32, track_running_stats=False).eval()  # batch statistics in eval mode too
    torch.testing.assert_close(norm.batch_norm(untracked, x), untracked(x))
