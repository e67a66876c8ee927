"""The fast path of OctConv (``OctConv._forward_fast``) must compute exactly the reference formula."""

from __future__ import annotations

import itertools

import pytest
import torch

from oct3d.nn import Octave, OctConv, kernels
from oct3d.nn.octave import is_channels_last, low_size, octave_factors, to_channels_last


def _make_input(conv: OctConv, batch: int, size: tuple[int, ...], dtype=torch.float32, memory_format=None):
    high = torch.randn(batch, conv.in_high, *size, dtype=dtype)
    if memory_format is not None:
        high = high.contiguous(memory_format=memory_format)
    if conv.in_low == 0:
        return high
    low = torch.randn(batch, conv.in_low, *low_size(size, octave_factors(conv.dims, conv.octave)), dtype=dtype)
    if memory_format is not None:
        low = low.contiguous(memory_format=memory_format)
    return Octave(high, low)


def _parts(y):
    return [y] if isinstance(y, torch.Tensor) else [t for t in y if t is not None]


def _assert_same(fast, ref, atol=1e-5, rtol=1e-5):
    fast_parts, ref_parts = _parts(fast), _parts(ref)
    assert len(fast_parts) == len(ref_parts)
    for a, b in zip(fast_parts, ref_parts):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


ALPHAS = [(0.0, 0.5), (0.5, 0.5), (0.5, 0.0), (0.25, 0.75)]
CASES = [
    # dims, octave, spatial size (odd sizes included)
    (1, "spatial", (17,)),
    (2, "spatial", (12, 10)),
    (2, "spatial", (9, 7)),
    (3, "spatial", (4, 8, 6)),
    (3, "spatiotemporal", (4, 8, 6)),
    (3, "spatiotemporal", (5, 7, 9)),
]


@pytest.mark.parametrize(("dims", "octave", "size"), CASES)
@pytest.mark.parametrize(("alpha_in", "alpha_out"), ALPHAS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [1, 3])
def test_fast_equals_reference(dims, octave, size, alpha_in, alpha_out, stride, kernel):
    torch.manual_seed(0)
    conv = OctConv(dims, 8, 8, kernel, alpha_in, alpha_out, stride=stride, bias=True, octave=octave)
    x = _make_input(conv, 2, size)
    _assert_same(conv(x), conv.forward_reference(x))


@pytest.mark.parametrize(("dims", "octave", "size"), [(2, "spatial", (9, 8)), (3, "spatiotemporal", (4, 6, 5))])
@pytest.mark.parametrize("stride", [1, (1, 2), 2])
def test_fast_equals_reference_groups_and_depthwise(dims, octave, size, stride):
    torch.manual_seed(0)
    stride = stride if isinstance(stride, int) else (1,) * (dims - 2) + stride
    grouped = OctConv(dims, 16, 16, 3, 0.5, 0.5, stride=stride, groups=4, octave=octave)
    depthwise = OctConv(dims, 8, 8, 3, 0.5, 0.5, stride=stride, groups=8, octave=octave)
    for conv in (grouped, depthwise):
        x = _make_input(conv, 2, size)
        _assert_same(conv(x), conv.forward_reference(x))


def test_per_axis_stride_and_dilation():
    torch.manual_seed(0)
    conv = OctConv(3, 8, 12, 3, 0.5, 0.5, stride=(1, 2, 2), dilation=(1, 2, 1), octave="spatiotemporal")
    x = _make_input(conv, 1, (6, 10, 8))
    _assert_same(conv(x), conv.forward_reference(x))


@pytest.mark.parametrize(("dims", "memory_format", "size"), [
    (2, torch.channels_last, (12, 11)),
    (3, torch.channels_last_3d, (4, 8, 10)),
])
@pytest.mark.parametrize("stride", [1, 2])
def test_channels_last(dims, memory_format, size, stride):
    torch.manual_seed(0)
    conv = OctConv(dims, 16, 16, 3, 0.5, 0.5, stride=stride).to(memory_format=memory_format)
    x = _make_input(conv, 2, size, memory_format=memory_format)
    _assert_same(conv(x), conv.forward_reference(x))


@pytest.mark.parametrize("alphas", [(0.0, 0.5), (0.5, 0.5), (0.5, 0.0)])
def test_bfloat16(alphas):
    torch.manual_seed(0)
    conv = OctConv(2, 16, 16, 3, *alphas, stride=2).to(torch.bfloat16)
    x = _make_input(conv, 2, (12, 12), dtype=torch.bfloat16)
    # bfloat16 keeps 8 bits of mantissa; the fast path sums in a different order.
    _assert_same(conv(x), conv.forward_reference(x), atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize(("dims", "octave", "size"), [(2, "spatial", (9, 8)), (3, "spatiotemporal", (4, 6, 6))])
@pytest.mark.parametrize(("alpha_in", "alpha_out"), ALPHAS)
@pytest.mark.parametrize("stride", [1, 2])
def test_gradients_equal(dims, octave, size, alpha_in, alpha_out, stride):
    torch.manual_seed(0)
    conv = OctConv(dims, 8, 8, 3, alpha_in, alpha_out, stride=stride, bias=True, octave=octave)
    x = _make_input(conv, 2, size)
    inputs = _parts(x)
    for t in inputs:
        t.requires_grad_(True)
    grads = []
    for forward in (conv.forward, conv.forward_reference):
        conv.zero_grad()
        for t in inputs:
            t.grad = None
        out = forward(x)
        sum((p * torch.linspace(-1, 1, p.numel()).view(p.shape)).sum() for p in _parts(out)).backward()
        grads.append([t.grad.clone() for t in inputs] + [p.grad.clone() for p in conv.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_weight_cache_follows_weight_updates(stride):
    """Eval/no-grad caches the concatenated weights; in-place updates must invalidate them."""
    torch.manual_seed(0)
    conv = OctConv(2, 8, 8, 3, 0.5, 0.5, stride=stride).eval()
    x = _make_input(conv, 1, (8, 8))
    with torch.no_grad(), kernels.force(high="cat", low="cat"):
        first = conv(x).low.clone()
        conv.h2l.weight.mul_(2.0)  # in place: same storage, new version
        _assert_same(conv(x), conv.forward_reference(x))
        conv.l2h.weight.mul_(3.0)
        _assert_same(conv(x), conv.forward_reference(x))
        assert not torch.allclose(conv(x).low, first)
        conv.load_state_dict({k: torch.randn_like(v) for k, v in conv.state_dict().items()})
        _assert_same(conv(x), conv.forward_reference(x))
        conv.l2l.weight = torch.nn.Parameter(torch.randn_like(conv.l2l.weight))  # new storage
        _assert_same(conv(x), conv.forward_reference(x))
    with torch.inference_mode():
        _assert_same(conv(x), conv.forward_reference(x))
    assert kernels.layer_cache(conv)  # the concatenated weights are cached, beside the module
    assert {key.split(".")[0] for key in conv.state_dict()} == {"h2h", "h2l", "l2h", "l2l"}


def test_training_step_after_cached_inference():
    """A cached no-grad forward followed by training must still reach every weight."""
    torch.manual_seed(0)
    conv = OctConv(2, 8, 8, 3, 0.5, 0.5)
    x = _make_input(conv, 1, (8, 8))
    with torch.no_grad():
        conv(x)
    out = conv(x)
    (out.high.sum() + out.low.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.parameters())


def test_fast_path_switch_is_honoured(monkeypatch):
    conv = OctConv(2, 8, 8, 3, 0.5, 0.5)
    calls = []
    monkeypatch.setattr(conv, "_forward_fast", lambda h, lo: calls.append(1) or conv._forward_reference(h, lo))
    conv(_make_input(conv, 1, (8, 8)))
    monkeypatch.setattr(OctConv, "fast_path", False)
    conv(_make_input(conv, 1, (8, 8)))
    assert calls == [1]


@pytest.mark.parametrize(("dims", "octave", "stride"), list(itertools.product([2], ["spatial"], [1, 2]))
                         + [(3, "spatiotemporal", 2)])
def test_compile_fullgraph_no_graph_breaks(dims, octave, stride):
    """Dynamo must trace the fast path in one graph (the eager backend keeps this test fast)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    conv = OctConv(dims, 8, 8, 3, 0.5, 0.5, stride=stride, octave=octave)
    x = _make_input(conv, 1, (8,) * dims)
    compiled = torch.compile(conv, fullgraph=True, backend="eager")
    with torch.no_grad():
        _assert_same(compiled(x), conv.forward_reference(x))
    _assert_same(compiled(x), conv.forward_reference(x))


def _count_onednn_calls(monkeypatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real = torch.mkldnn_convolution

    def counting(x, weight, *args):
        calls.append(tuple(weight.shape[2:]))
        return real(x, weight, *args)

    monkeypatch.setattr(torch, "mkldnn_convolution", counting)
    return calls


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_rule_sends_batch1_3d_paths_to_onednn_and_stays_exact(monkeypatch):
    """Without autotuning, batch-1 3D paths go to oneDNN (PyTorch would pick im2col): same values, grads, layout."""
    monkeypatch.setattr(kernels, "autotune", False)
    calls = _count_onednn_calls(monkeypatch)
    torch.manual_seed(0)
    conv = OctConv(3, 16, 16, (3, 3, 3), 0.5, 0.5, bias=True, octave="spatiotemporal")
    x = _make_input(conv, 1, (4, 10, 10))
    for t in _parts(x):
        t.requires_grad_(True)
    out = conv(x)
    assert calls, "no octave path used oneDNN"
    assert all(k == (3, 3, 3) for k in calls)
    ref = conv.forward_reference(x)
    _assert_same(out, ref)
    for a, b in zip(_parts(out), _parts(ref)):
        assert a.is_contiguous() == b.is_contiguous()
    fast_grads = torch.autograd.grad(sum(p.square().sum() for p in _parts(out)), [*_parts(x), *conv.parameters()])
    ref_grads = torch.autograd.grad(sum(p.square().sum() for p in _parts(ref)), [*_parts(x), *conv.parameters()])
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_rule_keeps_pytorch_kernel_for_pointwise_2d_and_bfloat16(monkeypatch):
    monkeypatch.setattr(kernels, "autotune", False)
    calls = _count_onednn_calls(monkeypatch)
    torch.manual_seed(0)
    pointwise = OctConv(3, 16, 16, 1, 0.5, 0.5, octave="spatiotemporal")
    planar = OctConv(2, 16, 16, 3, 0.5, 0.5)
    half = OctConv(3, 16, 16, 3, 0.5, 0.5, octave="spatiotemporal").to(torch.bfloat16)
    cubic = OctConv(3, 16, 16, 3, 0.5, 0.5, octave="spatiotemporal")
    with torch.no_grad():
        pointwise(_make_input(pointwise, 1, (4, 8, 8)))
        planar(_make_input(planar, 1, (8, 8)))
        half(_make_input(half, 1, (4, 8, 8), dtype=torch.bfloat16))
        cubic(_make_input(cubic, 2, (4, 8, 8)))  # batch 2: PyTorch already picks oneDNN
        with torch.backends.mkldnn.flags(enabled=False):  # the user's switch is honoured
            cubic(_make_input(cubic, 1, (4, 8, 8)))
    assert calls == []


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("dims", [2, 3])
def test_rule_packs_the_weights_of_channels_last_inference(monkeypatch, dims):
    """Without autotuning, eval-mode inference on channels_last maps takes the packed weights (no
    per-call weight reorder), at any batch size; channels-first maps and training mode do not."""
    monkeypatch.setattr(kernels, "autotune", False)
    used = _count_kernels(monkeypatch)
    torch.manual_seed(0)
    conv = OctConv(dims, 16, 16, 3, 0.5, 0.5, bias=True).eval()
    size = (8, 8) if dims == 2 else (4, 8, 8)
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    for batch in (1, 3):
        x = _make_input(conv, batch, size, memory_format=layout)
        with torch.no_grad():
            out = conv(x)
        assert set(used) == {"onednn_packed"}, used
        _assert_same(out, conv.forward_reference(x))
        assert all(is_channels_last(t) for t in _parts(out))
        used.clear()
    with torch.no_grad():
        conv(_make_input(conv, 1, size))  # channels-first: the output would be converted back
    assert "onednn_packed" not in used
    used.clear()
    with torch.no_grad():
        conv.train()(_make_input(conv, 1, size, memory_format=layout))  # training mode caches nothing
    assert "onednn_packed" not in used and used


def test_mkldnn_switch_is_honoured_even_when_forced(monkeypatch):
    calls = _count_onednn_calls(monkeypatch)
    conv = OctConv(3, 16, 16, 3, 0.5, 0.5, octave="spatiotemporal")
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False), kernels.force(conv="onednn"):
        conv(_make_input(conv, 1, (4, 8, 8)))
    assert calls == []


def _cubic_layer_and_input():
    torch.manual_seed(0)
    conv = OctConv(3, 16, 16, 3, 0.5, 0.5, bias=True, octave="spatiotemporal")
    return conv, _make_input(conv, 1, (4, 8, 8))


def test_flop_counter_sees_every_path_on_cpu():
    """FlopCounterMode has no formula for oneDNN's op: counting on CPU must equal counting on meta."""
    from oct3d.profiling import count_macs

    conv, _ = _cubic_layer_and_input()
    model = torch.nn.Sequential(OctConv(3, 16, 16, 3, 0.0, 0.5, octave="spatiotemporal"), conv,
                                OctConv(3, 16, 16, 3, 0.5, 0.0, octave="spatiotemporal"))
    on_cpu = count_macs(model, (1, 16, 4, 8, 8))
    with torch.device("meta"):
        meta_model = torch.nn.Sequential(OctConv(3, 16, 16, 3, 0.0, 0.5, octave="spatiotemporal"),
                                         OctConv(3, 16, 16, 3, 0.5, 0.5, octave="spatiotemporal"),
                                         OctConv(3, 16, 16, 3, 0.5, 0.0, octave="spatiotemporal"))
    assert on_cpu == count_macs(meta_model, (1, 16, 4, 8, 8)) > 0


def test_cpu_autocast_gives_the_reference_dtypes():
    conv, x = _cubic_layer_and_input()
    for grad in (False, True):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16):
            fast, ref = conv(x), conv.forward_reference(x)
        assert [t.dtype for t in _parts(fast)] == [t.dtype for t in _parts(ref)] == [torch.bfloat16] * 2


def test_forward_mode_ad_and_vmap_work():
    conv, x = _cubic_layer_and_input()
    tangent = Octave(torch.randn_like(x.high), torch.randn_like(x.low))
    out, jvp = torch.func.jvp(conv, (x,), (tangent,))
    ref_out, ref_jvp = torch.func.jvp(conv.forward_reference, (x,), (tangent,))
    _assert_same(out, ref_out)
    _assert_same(jvp, ref_jvp, atol=1e-4)
    batched = Octave(x.high.expand(3, *x.high.shape), x.low.expand(3, *x.low.shape))
    _assert_same(torch.func.vmap(conv)(batched), torch.func.vmap(conv.forward_reference)(batched))


def test_hooked_or_pruned_paths_take_the_reference_formula():
    """Hooks must fire and see an output nobody mutates afterwards; pruning pre-hooks must apply."""
    conv, x = _cubic_layer_and_input()
    seen = []
    handle = conv.h2h.register_forward_hook(lambda module, args, output: seen.append(output.clone()) or None)
    stored = []
    conv.l2l.register_forward_hook(lambda module, args, output: stored.append(output))
    with torch.no_grad():
        out = conv(x)
    assert len(seen) == 1 and len(stored) == 1
    torch.testing.assert_close(stored[0], conv.l2l(avg_pool_low(conv, x)))  # not added into
    handle.remove()

    from torch.nn.utils import prune

    conv, x = _cubic_layer_and_input()
    prune.l1_unstructured(conv.h2h, "weight", amount=0.5)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.5)
    out = conv(x)
    sum(t.sum() for t in _parts(out)).backward()
    optimizer.step()
    with torch.no_grad():
        _assert_same(conv(x), conv.forward_reference(x))
        assert (conv.h2h.weight == 0).sum() >= conv.h2h.weight.numel() // 2


def avg_pool_low(conv, x):
    from oct3d.nn.octave import avg_pool

    return avg_pool(x.low, conv._pool_l2l)


@pytest.mark.parametrize(("shape", "factors"), [
    ((2, 3, 16), (2,)),
    ((2, 3, 8, 12), (2, 2)),
    ((2, 3, 8, 12), (4, 4)),
    ((1, 3, 4, 8, 6), (2, 2, 2)),
    ((1, 3, 4, 8, 6), (1, 2, 2)),
    ((1, 3, 4, 8, 8), (2, 4, 4)),
])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_pool_equals_pytorch_pool(shape, factors, channels_last, dtype):
    """The CPU pairwise-sum pool must equal avg_poolNd in values and gradients, and keep the input's layout."""
    from oct3d.nn.octave import _pool_by_pairs, _pool_by_pairs_is_faster, avg_pool

    if channels_last and len(shape) == 3:
        pytest.skip("1D maps have no channels_last format")
    torch.manual_seed(0)
    pool = (torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d, torch.nn.functional.avg_pool3d)
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape), torch.contiguous_format)
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=layout)
    with torch.no_grad():
        # channels_last 2D maps take avg_pool2d's channels_last kernel (faster); the pairs must still be right.
        assert _pool_by_pairs_is_faster(x, factors) is not (channels_last and len(shape) == 4)
        out = avg_pool(x, factors)
        torch.testing.assert_close(out, pool[len(factors) - 1](x, factors, factors))
        assert out.is_contiguous(memory_format=layout if channels_last else torch.contiguous_format)
    x.requires_grad_(True)
    reference = pool[len(factors) - 1](x, factors, factors)
    weights = torch.randn_like(reference)  # a non-uniform upstream gradient
    # _pool_by_pairs directly: under autograd avg_pool itself takes the pooling kernel for windows wider than 2.
    (got,) = torch.autograd.grad((_pool_by_pairs(x, factors) * weights).sum(), x)
    (expected,) = torch.autograd.grad((reference * weights).sum(), x)
    torch.testing.assert_close(got, expected)


def test_pairwise_pool_is_skipped_where_it_would_be_wrong_or_slow():
    from oct3d.nn.octave import _pool_by_pairs_is_faster

    assert not _pool_by_pairs_is_faster(torch.randn(1, 2, 7, 8), (2, 2))  # partial window at an odd border
    assert not _pool_by_pairs_is_faster(torch.randn(1, 2, 6, 6), (3, 3))  # not a power of two
    assert not _pool_by_pairs_is_faster(torch.randn(1, 2, 8, 8, dtype=torch.bfloat16), (2, 2))
    assert not _pool_by_pairs_is_faster(torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last), (2, 2))
    with torch.enable_grad():
        # Under autograd wide windows need the one-kernel backward, which only plain eager mode has.
        assert _pool_by_pairs_is_faster(torch.randn(1, 2, 8, 8, requires_grad=True), (4, 4))
        with torch.autocast("cpu", torch.bfloat16):
            assert not _pool_by_pairs_is_faster(torch.randn(1, 2, 8, 8, requires_grad=True), (4, 4))
        assert _pool_by_pairs_is_faster(torch.randn(1, 2, 8, 8, requires_grad=True), (2, 2))


POOL_CASES = [
    ((2, 3, 8, 6), (2, 2), None), ((1, 4, 8, 12), (4, 2), torch.channels_last), ((1, 5, 6, 9), (3, 3), None),
    ((1, 8, 4, 6, 8), (1, 2, 2), torch.channels_last_3d), ((2, 8, 4, 6, 8), (2, 2, 2), torch.channels_last_3d),
    ((1, 1, 4, 6, 8), (1, 2, 2), torch.channels_last_3d), ((2, 1, 4, 6, 8), (2, 2, 2), torch.channels_last_3d),
    ((1, 1, 8, 6), (2, 2), torch.channels_last), ((2, 3, 4, 6, 8), (2, 2, 2), None),
    ((1, 4, 5, 7, 8), (2, 2, 2), torch.channels_last_3d),  # odd sizes: partial border windows
    ((2, 3, 12), (2,), None),
]


@pytest.mark.parametrize("kernel", kernels.POOL_KERNELS)
@pytest.mark.parametrize(("shape", "factors", "layout"), POOL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_pool_kernel_equals_pytorch_pool_and_keeps_the_layout(monkeypatch, kernel, shape, factors, layout,
                                                                    dtype):
    """Each pooling kernel, forced, equals avg_poolNd (ceil mode, partial windows averaging what they cover)."""
    import torch.nn.functional as F

    from oct3d.nn.octave import avg_pool

    used = []
    real_run_pool = kernels.run_pool
    monkeypatch.setattr(kernels, "run_pool", lambda k, *a: used.append(k) or real_run_pool(k, *a))
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    if layout is not None:
        # A one-channel map is channels_last by its channel stride of 1 (what the models' inputs get).
        x = to_channels_last(x) if shape[1] == 1 else x.contiguous(memory_format=layout)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(factors) - 1]
    expected = pool(x, factors, factors, 0, ceil_mode=True, count_include_pad=False)
    with torch.no_grad(), kernels.force(pool=kernel):
        out = avg_pool(x, factors)
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=layout or torch.contiguous_format)
    assert is_channels_last(out) == (layout is not None)
    if layout is not None and shape[1] == 1:
        assert out.stride(1) == 1, out.stride()  # else the convolution after it returns channels-first
    applicable = kernels.pool_kernels(x, factors)
    assert used == [kernel if kernel in applicable else used[0]]
    exact = all(n % f == 0 for n, f in zip(shape[2:], factors))
    if kernel == "onednn_depthwise" and exact and len(factors) > 1 and dtype == torch.float32:
        assert kernel in applicable, applicable  # where it applies, it is what ran


def test_a_tuned_pool_choice_is_not_reused_where_that_kernel_cannot_run():
    """Tuned to oneDNN in plain eager mode, the same shape under forward AD must not call oneDNN."""
    from oct3d.nn.octave import avg_pool

    kernels.clear_cache()
    x = torch.randn(1, 8, 4, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    kernels._cache[("pool", *kernels._signature(x), (1, 2, 2), False, (False,), torch.get_num_threads())] = (
        "onednn_depthwise")  # as if timing had chosen it
    _, tangent = torch.func.jvp(lambda t: avg_pool(t, (1, 2, 2)), (x,), (torch.ones_like(x),))
    torch.testing.assert_close(tangent, torch.ones(1, 8, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d))
    kernels.clear_cache()


def test_pool_choice_is_timed_once_cached_and_never_taken_under_autograd(monkeypatch):
    """Without autograd the pool kernel is tuned once per setting; with autograd the differentiable pool runs."""
    from oct3d.nn.octave import avg_pool

    kernels.clear_cache()
    monkeypatch.setattr(kernels, "autotune", True)
    timed = []
    real_time = kernels._time_options
    monkeypatch.setattr(kernels, "_time_options", lambda options, *a: timed.append(sorted(options)) or
                        real_time(options, *a))
    x = torch.randn(1, 8, 4, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        for _ in range(3):
            avg_pool(x, (1, 2, 2))
    assert timed == [sorted(kernels.POOL_KERNELS)]
    assert sum(kernels.cache_info()["pool"].values()) == 1
    used = []
    real_run_pool = kernels.run_pool
    monkeypatch.setattr(kernels, "run_pool", lambda k, *a: used.append(k) or real_run_pool(k, *a))
    x.requires_grad_(True)
    avg_pool(x, (1, 2, 2)).sum().backward()
    assert used == [] and torch.allclose(x.grad, torch.full_like(x, 0.25))
    monkeypatch.setattr(kernels, "autotune", False)  # the rule: the pairwise adds on exact 3D windows
    with torch.no_grad():
        avg_pool(x.detach(), (1, 2, 2))
    assert used == ["pairs"]
    with pytest.raises(ValueError, match="pool must be one of"), kernels.force(pool="fast"):
        pass
    kernels.clear_cache()


@pytest.mark.parametrize(("shape", "factors", "layout"), [
    ((2, 3, 8, 6), (2, 2), None), ((1, 4, 8, 12), (4, 2), torch.channels_last),
    ((2, 8, 4, 6, 8), (1, 2, 2), torch.channels_last_3d), ((1, 8, 4, 6, 8), (2, 2, 2), torch.channels_last_3d),
    ((2, 3, 4, 6, 8), (2, 2, 2), None), ((2, 5, 6, 4), (2, 2), torch.channels_last),
])
def test_pairwise_pool_gradient_is_exact_keeps_the_layout_and_double_backward_works(shape, factors, layout):
    import torch.nn.functional as F

    from oct3d.nn.octave import avg_pool

    x = torch.randn(shape, dtype=torch.float64)
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    x.requires_grad_(True)
    pool = (F.avg_pool2d, F.avg_pool3d)[len(shape) - 4]
    out, ref = avg_pool(x, factors), pool(x, factors)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    (got,), (want,) = torch.autograd.grad(out, x, g), torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(got, want)
    assert got.stride() == x.stride()
    assert torch.autograd.gradcheck(lambda t: avg_pool(t, factors), (x,))
    assert torch.autograd.gradgradcheck(lambda t: avg_pool(t, factors) ** 2, (x,))


def test_channels_last_2d_pool_backward_is_oct3ds_and_takes_a_sliced_gradient():
    """Exact windows of a channels_last 2D map under autograd take the one-kernel backward, also for
    the channel slice a concatenation (the "cat" layer plan) hands it."""
    import torch.nn.functional as F

    from oct3d.nn.octave import avg_pool

    x = torch.randn(2, 6, 8, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    other = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out = avg_pool(x, (2, 2))
    assert type(out.grad_fn).__name__ == "_ExactPoolFunctionBackward"
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 9, 4, 5, dtype=torch.float64)
    (got,) = torch.autograd.grad(torch.cat([out, other], 1), x, g)
    (want,) = torch.autograd.grad(torch.cat([F.avg_pool2d(x, 2), other], 1), x, g)
    torch.testing.assert_close(got, want)
    assert got.stride() == x.stride()
    # A partial border window (odd size) keeps PyTorch's pooling and its backward.
    odd = torch.randn(1, 4, 7, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert type(avg_pool(odd, (2, 2)).grad_fn).__name__ != "_ExactPoolFunctionBackward"


@pytest.mark.parametrize("layout", [None, torch.channels_last_3d])
def test_training_low_to_high_add_has_exact_gradients_in_the_maps_layout(layout):
    from oct3d.nn.conv import _add_upsampled_
    from oct3d.nn.octave import upsample_to

    y0 = torch.randn(2, 4, 4, 6, 8, dtype=torch.float64)
    small = torch.randn(2, 4, 4, 3, 4, dtype=torch.float64)
    if layout is not None:
        y0, small = y0.contiguous(memory_format=layout), small.contiguous(memory_format=layout)
    y0.requires_grad_(True)
    small.requires_grad_(True)
    g = torch.randn(2, 4, 4, 6, 8, dtype=torch.float64)
    out = _add_upsampled_(y0 * 1.0, small, (1, 2, 2))  # a fresh non-leaf map, as a conv output is
    ref = y0 + upsample_to(small, (1, 2, 2), (4, 6, 8))
    torch.testing.assert_close(out, ref)
    got, want = torch.autograd.grad(out, (y0, small), g), torch.autograd.grad(ref, (y0, small), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradgradcheck(lambda a, b: _add_upsampled_(a * 1.0, b, (1, 2, 2)) ** 2, (y0, small))


@pytest.mark.parametrize(("memory_format", "weight_format"), [
    (torch.contiguous_format, torch.contiguous_format),
    (torch.channels_last_3d, torch.channels_last_3d),
    (torch.contiguous_format, torch.channels_last_3d),  # F.conv3d then returns channels_last_3d
])
def test_training_runs_1xkxk_paths_over_frames_with_reference_values_and_grads(monkeypatch, memory_format,
                                                                                weight_format):
    """Under autograd on CPU, 1xkxk paths run as 2D convolutions over frames: same values, grads and layout."""
    monkeypatch.setattr(kernels, "autotune", False)
    calls = []
    real = kernels._conv_over_frames
    monkeypatch.setattr(kernels, "_conv_over_frames", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    conv = OctConv(3, 16, 24, (1, 3, 3), 0.5, 0.5, bias=True, dilation=(1, 2, 1), octave="spatiotemporal")
    conv = conv.to(memory_format=weight_format)
    x = _make_input(conv, 2, (4, 10, 8), memory_format=memory_format)
    for t in _parts(x):
        t.requires_grad_(True)
    out = conv(x)
    assert calls, "no path ran over frames"
    ref = conv.forward_reference(x)
    _assert_same(out, ref)
    for part, ref_part in zip(_parts(out), _parts(ref)):
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            assert part.is_contiguous(memory_format=layout) == ref_part.is_contiguous(memory_format=layout)
    weights = [torch.randn_like(p) for p in _parts(ref)]
    wrt = [*_parts(x), *conv.parameters()]
    fast_grads = torch.autograd.grad(sum((p * w).sum() for p, w in zip(_parts(out), weights)), wrt)
    ref_grads = torch.autograd.grad(sum((p * w).sum() for p, w in zip(_parts(ref), weights)), wrt)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    calls.clear()
    with torch.no_grad():
        conv(x)
    assert calls == []  # inference keeps the 3D call


# ----------------------------------------------------------------------------- every kernel choice, forced
def _count_kernels(monkeypatch) -> list[str]:
    used: list[str] = []
    real = kernels.run_conv
    monkeypatch.setattr(kernels, "run_conv", lambda kernel, *a: used.append(kernel) or real(kernel, *a))
    return used


def _check_against_reference(conv, x, atol=1e-4, layout_of_input=False):
    """Values, memory format and gradients (inputs and weights) of conv(x) equal the reference formula's.

    ``layout_of_input``: the output's memory format must be the input's instead of the reference's
    (PyTorch's circular padding returns a channels_last map channels-first; the fast path does not).
    """
    inputs = [t.detach().requires_grad_(True) for t in _parts(x)]
    x = inputs[0] if len(inputs) == 1 else Octave(*inputs)
    out, ref = conv(x), conv.forward_reference(x)
    _assert_same(out, ref)
    for part, ref_part in zip(_parts(out), _parts(ref)):
        layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(part.dim(), torch.contiguous_format)
        like = inputs[0] if layout_of_input else ref_part
        assert part.is_contiguous(memory_format=layout) == like.is_contiguous(memory_format=layout)
        assert part.is_contiguous() == like.is_contiguous()
    weights = [torch.randn_like(p) for p in _parts(ref)]
    wrt = [*inputs, *conv.parameters()]
    got = torch.autograd.grad(sum((p * w).sum() for p, w in zip(_parts(out), weights)), wrt)
    want = torch.autograd.grad(sum((p * w).sum() for p, w in zip(_parts(ref), weights)), wrt)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
    with torch.no_grad():
        _assert_same(conv(x), conv.forward_reference(x))


KERNEL_CASES = [
    # dims, octave, kernel, batch, size, channels_last
    (2, "spatial", 3, 1, (8, 10), False),
    (2, "spatial", 3, 2, (9, 8), True),
    (2, "spatial", 1, 1, (8, 8), False),
    (3, "spatial", (1, 3, 3), 1, (3, 8, 6), False),
    (3, "spatiotemporal", (1, 3, 3), 2, (4, 6, 6), True),
    (3, "spatiotemporal", 3, 1, (4, 6, 6), False),
    (2, "spatial", 1, 2, (8, 6), True),
    (3, "spatial", 1, 2, (2, 6, 4), True),
]


@pytest.mark.parametrize("kernel", kernels.KERNELS)
@pytest.mark.parametrize(("dims", "octave", "kernel_size", "batch", "size", "channels_last"), KERNEL_CASES)
@pytest.mark.parametrize("stride", [1, 2])
def test_every_conv_kernel_equals_the_reference(monkeypatch, kernel, dims, octave, kernel_size, batch, size,
                                                channels_last, stride):
    """Each kernel, forced (not chosen by timing), matches the formula in values, gradients and layout."""
    used = _count_kernels(monkeypatch)
    torch.manual_seed(0)
    layout = {2: torch.channels_last, 3: torch.channels_last_3d}[dims] if channels_last else None
    conv = OctConv(dims, 16, 16, kernel_size, 0.5, 0.5, stride=stride, bias=True, octave=octave)
    if layout is not None:
        conv = conv.to(memory_format=layout)
    x = _make_input(conv, batch, size, memory_format=layout)
    with kernels.force(conv=kernel):
        _check_against_reference(conv, x)
    applicable = kernels.conv_kernels(x.high, conv.h2h.weight, (1,) * dims, conv.padding, 1, plain=True)
    if kernel in applicable:
        assert kernel in used, (kernel, used, applicable)
    # Eval mode without autograd: where the cached-weight kernel applies (every kernel is checked again).
    conv.eval()
    used.clear()
    with torch.no_grad(), kernels.force(conv=kernel):
        out, ref = conv(x), conv.forward_reference(x)
        _assert_same(out, ref, atol=1e-4)
        for part, ref_part in zip(_parts(out), _parts(ref)):
            assert part.is_contiguous() == ref_part.is_contiguous()
        applicable = kernels.conv_kernels(x.high, conv.h2h.weight, (1,) * dims, conv.padding, 1, plain=True)
    if kernel in applicable:
        assert kernel in used, (kernel, used, applicable)
    kernels.clear_cache()


@pytest.mark.parametrize("family", ["high", "low"])
@pytest.mark.parametrize("option", ["cat", "split"])
@pytest.mark.parametrize(("alpha_in", "alpha_out"), [(0.5, 0.5), (0.5, 0.0), (0.0, 0.5)])
@pytest.mark.parametrize(("dims", "size", "channels_last"), [(2, (8, 6), False), (2, (7, 9), True),
                                                             (3, (3, 8, 6), False)])
def test_every_layer_plan_equals_the_reference(monkeypatch, family, option, alpha_in, alpha_out, dims, size,
                                               channels_last):
    """One convolution over concatenated inputs and two convolutions plus an add are both the formula."""
    calls = []
    real = OctConv._sum_of_convs
    monkeypatch.setattr(OctConv, "_sum_of_convs", lambda self, fam, *a: calls.append(fam) or real(self, fam, *a))
    torch.manual_seed(0)
    layout = {2: torch.channels_last, 3: torch.channels_last_3d}[dims] if channels_last else None
    conv = OctConv(dims, 16, 12, 3, alpha_in, alpha_out, stride=2 if family == "high" else 1, bias=True)
    if layout is not None:
        conv = conv.to(memory_format=layout)
    with kernels.force(**{family: option}):
        _check_against_reference(conv, _make_input(conv, 2, size, memory_format=layout))
    assert (family in calls) == (alpha_in > 0 and (family == "high" or alpha_out > 0))


def test_pool_first_vanilla_layer_takes_the_kernel_choice(monkeypatch):
    used = _count_kernels(monkeypatch)
    torch.manual_seed(0)
    conv = OctConv(2, 8, 8, 3, 0.0, 0.0, stride=2, pool_first=True, bias=True)
    with kernels.force(conv="onednn"):
        _check_against_reference(conv, torch.randn(1, 8, 9, 10))
    assert "onednn" in used


def test_autotune_times_options_once_and_caches_the_fastest(monkeypatch):
    import time

    monkeypatch.setattr(kernels, "autotune", True)
    kernels.clear_cache()
    calls = {"slow": 0, "fast": 0}

    def slow(x):
        calls["slow"] += 1
        time.sleep(0.002)
        return x * 2

    def fast(x):
        calls["fast"] += 1
        return x * 2

    x = torch.randn(4)
    key = ("test-family", 1)
    assert kernels.choose(key, {"slow": slow, "fast": fast}, (x,), "slow") == "fast"
    assert calls == {"slow": 1 + kernels.TUNE_REPS, "fast": 1 + kernels.TUNE_REPS}
    assert kernels.choose(key, {"slow": slow, "fast": fast}, (x,), "slow") == "fast"  # cached: not timed again
    assert calls["slow"] == 1 + kernels.TUNE_REPS
    assert kernels.cache_info()["test-family"] == {"fast": 1}
    # A backward pass follows under autograd: a separate setting, timed with its backward.
    x.requires_grad_(True)
    assert kernels.choose(key, {"slow": slow, "fast": fast}, (x,), "slow") == "fast"
    assert x.grad is None  # tuning ran on a detached copy
    # A candidate far slower than the fastest warm-up is not timed again.
    glacial_calls = []
    glacial = {"fast": fast, "glacial": lambda x: glacial_calls.append(1) or time.sleep(0.02) or x}
    assert kernels.choose(("test-family", 3), glacial, (x.detach(),), "fast") == "fast"
    assert glacial_calls == [1]
    broken = {"slow": slow, "broken": lambda x: (_ for _ in ()).throw(RuntimeError("unsupported"))}
    assert kernels.choose(("test-family", 2), broken, (x,), "slow") == "slow"
    kernels.clear_cache()
    assert kernels.cache_info() == {}


def test_no_timing_when_off_or_unsafe(monkeypatch):
    """Autotune off, autocast, dispatch modes, torch.func, saved-tensor hooks: the fallback, untimed and uncached."""
    from torch.utils.flop_counter import FlopCounterMode

    kernels.clear_cache()
    calls = []
    options = {"a": lambda x: calls.append("a") or x, "b": lambda x: calls.append("b") or x}
    x = torch.randn(3)
    contexts = [
        lambda: torch.autocast("cpu", torch.bfloat16),
        lambda: FlopCounterMode(display=False),
        lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
    ]
    for context in contexts:
        with context():
            assert kernels.choose(("unsafe",), options, (x,), "b") == "b"
    torch.func.vmap(lambda v: torch.tensor(kernels.choose(("unsafe",), options, (v,), "b") == "b"))(x.view(3, 1))
    monkeypatch.setattr(kernels, "autotune", False)
    assert kernels.choose(("unsafe",), options, (x,), "b") == "b"
    assert calls == [] and kernels.cache_info() == {}


def test_autotune_env_var_turns_it_off():
    import os
    import subprocess
    import sys

    code = "import oct3d.nn.kernels as k; print(k.autotune)"
    for value, expected in (("0", "False"), ("off", "False"), ("1", "True")):
        env = {**os.environ, "OCT3D_AUTOTUNE": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


def test_compiled_layer_uses_plain_convolutions(monkeypatch):
    """Under torch.compile no kernel is timed and no direct oneDNN call is traced."""
    torch._dynamo.reset()
    kernels.clear_cache()
    conv = OctConv(3, 8, 8, 3, 0.5, 0.5, octave="spatiotemporal")
    x = _make_input(conv, 1, (4, 8, 8))
    with torch.no_grad(), kernels.force("default", pool="avg_pool"):
        expected = conv.forward_reference(x)  # eager: kept away from oneDNN and the tuning cache
    calls = _count_onednn_calls(monkeypatch)
    compiled = torch.compile(conv, fullgraph=True, backend="eager")
    with torch.no_grad():
        _assert_same(compiled(x), expected)
    assert calls == [] and kernels.cache_info() == {}


def test_plain_pair_input_is_accepted():
    torch.manual_seed(0)
    conv = OctConv(2, 8, 8, 3, 0.5, 0.5)
    x = _make_input(conv, 1, (8, 8))
    for pair in (tuple(x), list(x)):
        _assert_same(conv(pair), conv.forward_reference(x))
    with pytest.raises(TypeError, match=r"\(high, low\) pair of tensors, got tuple of length 3"):
        conv((x.high, x.low, x.low))


def test_batch1_pairwise_pool_stays_channels_last_for_cat_and_convs():
    """At batch 1 the pooled map must be a proper channels_last tensor (not just one by the size-1 rule)."""
    from oct3d.nn.octave import avg_pool

    for layout, shape, factors in ((torch.channels_last_3d, (1, 4, 4, 8, 8), (1, 2, 2)),
                                   (torch.channels_last, (1, 4, 8, 8), (2, 2))):
        x = torch.randn(shape).contiguous(memory_format=layout)
        pooled = avg_pool(x, factors)
        other = torch.randn(pooled.shape).contiguous(memory_format=layout)
        joined = torch.cat([pooled, other], dim=1)
        assert not joined.is_contiguous() and joined.is_contiguous(memory_format=layout)
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(avg_pool(x, factors).sum(), x)
        torch.testing.assert_close(grad, torch.full_like(x, 1.0 / (factors[-1] * factors[-2])))


needs_onednn = pytest.mark.skipif(kernels._PACKED_CONV is None, reason="no oneDNN packed convolution")


@needs_onednn
@pytest.mark.parametrize(("dims", "channels_last"), [(2, False), (2, True), (3, False), (3, True)])
def test_packed_kernel_equals_reference_and_repacks_changed_weights(dims, channels_last):
    """Without autograd the packed kernel is the formula; an in-place weight update is never served stale."""
    torch.manual_seed(0)
    layout = {2: torch.channels_last, 3: torch.channels_last_3d}[dims] if channels_last else None
    conv = OctConv(dims, 16, 16, 3, 0.5, 0.5, bias=True).eval()
    if layout is not None:
        conv = conv.to(memory_format=layout)
    x = _make_input(conv, 1, (6, 8) if dims == 2 else (4, 6, 8), memory_format=layout)
    kernels.clear_cache()
    with torch.no_grad(), kernels.force(conv="onednn_packed"):
        out = conv(x)
        _assert_same(out, conv.forward_reference(x), atol=1e-4)
        for part in _parts(out):  # the input's layout (F.conv3d's batch-1 im2col fallback would drop it)
            assert part.is_contiguous(memory_format=layout or torch.contiguous_format)
        packed_before = len(kernels._packed)
        assert packed_before > 0
        for p in conv.parameters():
            p.mul_(-0.5)  # an optimizer step, load_state_dict or fuse: an in-place update
        _assert_same(conv(x), conv.forward_reference(x), atol=1e-4)
        conv.load_state_dict({k: torch.randn_like(v) for k, v in conv.state_dict().items()})
        _assert_same(conv(x), conv.forward_reference(x), atol=1e-4)
    kernels.clear_cache()
    assert len(kernels._packed) == 0


@needs_onednn
def test_packed_kernel_is_offered_only_without_autograd():
    conv = OctConv(2, 8, 8, 3, 0.5, 0.5)
    x = torch.randn(1, 4, 8, 8)
    args = (x, conv.h2h.weight, (1, 1), conv.padding, 1)
    assert "onednn_packed" not in kernels.conv_kernels(*args, plain=True)
    with torch.no_grad():
        assert "onednn_packed" in kernels.conv_kernels(*args, plain=True)
    with torch.inference_mode():
        assert "onednn_packed" in kernels.conv_kernels(*args, plain=True)


@needs_onednn
def test_packed_weights_are_bounded_per_weight_and_die_with_it():
    import gc

    kernels.clear_cache()
    weight = torch.randn(8, 8, 3, 3)
    for size in range(4, 4 + kernels.PACKED_PER_WEIGHT + 3):
        kernels.packed_weight(weight, (1, 8, size, size), (1, 1), (1, 1), (1, 1), 1)
    assert len(kernels._packed[weight]) == kernels.PACKED_PER_WEIGHT
    del weight
    gc.collect()
    assert len(kernels._packed) == 0
    # Keyed by identity: a new tensor that reuses a dead one's id is never served the dead one's copies.
    first = torch.randn(8, 8, 3, 3)
    kernels.packed_weight(first, (1, 8, 6, 6), (1, 1), (1, 1), (1, 1), 1)
    stale = kernels._packed._items[id(first)]
    del first
    gc.collect()
    second = torch.randn(8, 8, 3, 3)
    kernels._packed._items[id(second)] = stale  # as if the id had been reused before the callback ran
    assert kernels._packed.get(second) is None and len(kernels._packed) == 0


def test_memoised_choice_follows_autotune_and_clear_cache(monkeypatch):
    """conv_nd's memo never outlives clear_cache, and turning autotune off takes effect at once."""
    used = _count_kernels(monkeypatch)
    conv = OctConv(3, 8, 8, (1, 3, 3), 0.5, 0.5)
    x = _make_input(conv, 2, (4, 6, 6))
    x = Octave(x.high.requires_grad_(), x.low.requires_grad_())
    monkeypatch.setattr(kernels, "autotune", False)
    kernels.clear_cache()
    conv(x)
    assert set(used) == {"frames"}  # the rule under autograd for 1 x k x k kernels
    assert kernels._resolved_convs
    kernels.clear_cache()
    assert not kernels._resolved_convs and kernels.memo(("any",)) is None
    assert kernels.memo(("any",), "split") == "split" and kernels.memo(("any",)) == "split"
    kernels.clear_cache()


def test_deterministic_mode_turns_timing_off(monkeypatch):
    """torch.use_deterministic_algorithms(True) (Lightning's deterministic=True) gets the rule, never timing."""
    used = _count_kernels(monkeypatch)
    monkeypatch.setattr(kernels, "autotune", True)
    monkeypatch.setattr(kernels, "_time_options", lambda *a, **k: pytest.fail("timed under deterministic mode"))
    conv = OctConv(3, 8, 8, (1, 3, 3), 0.5, 0.5)
    x = _make_input(conv, 2, (4, 6, 6))
    x = Octave(x.high.requires_grad_(), x.low.requires_grad_())
    kernels.clear_cache()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not kernels.tuning_enabled()
        conv(x)
    finally:
        torch.use_deterministic_algorithms(previous)
        kernels.clear_cache()
    assert set(used) == {"frames"}  # the rule under autograd for 1 x k x k kernels
    assert kernels.tuning_enabled()


@pytest.mark.parametrize(("shape", "factors"), [
    ((2, 8, 6, 10, 12), (1, 2, 2)), ((2, 8, 6, 10, 12), (2, 2, 2)), ((1, 5, 7, 4, 6), (1, 1, 2)),
    ((2, 3, 4, 6, 8), (2, 1, 1)), ((1, 4, 6, 8), (2, 2)), ((3, 6, 5, 4), (1, 2)),
])
def test_channels_last_upsampled_add_is_exact_and_keeps_the_layout(shape, factors):
    import torch.nn.functional as F

    from oct3d.nn.conv import _add_upsampled_

    layout = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    y = torch.randn(shape).contiguous(memory_format=layout)
    small = torch.randn(*shape[:2], *(n // f for n, f in zip(shape[2:], factors))).contiguous(memory_format=layout)
    want = y + F.interpolate(small, scale_factor=[float(f) for f in factors], mode="nearest")
    with torch.no_grad():
        got = _add_upsampled_(y, small, factors)
    assert got is y and torch.equal(got, want)
    assert got.is_contiguous(memory_format=layout)


@needs_onednn
def test_packed_kernel_under_inference_mode():
    """inference_mode tensors have no version counter: the cat weights stay normal tensors, and an
    inference-mode weight is packed for its call only."""
    torch.manual_seed(0)
    conv = OctConv(2, 16, 16, 3, 0.5, 0.5, bias=True).eval()
    x = _make_input(conv, 1, (8, 8))
    kernels.clear_cache()
    with kernels.force(conv="onednn_packed", low="cat"):
        with torch.inference_mode():
            out = conv(x)
        with torch.no_grad():
            _assert_same(out, conv.forward_reference(x), atol=1e-4)
            _assert_same(conv(x), out, atol=1e-4)
        with torch.inference_mode():
            weight = torch.randn(8, 8, 3, 3)
            got = kernels.run_conv("onednn_packed", x.high, weight, None, (1, 1), (1, 1), (1, 1), 1)
        torch.testing.assert_close(got, torch.nn.functional.conv2d(x.high, weight, padding=1), atol=1e-4, rtol=1e-5)
    assert all(not w.is_inference() for w, _entries in kernels._packed.items())
    for entry in kernels.layer_cache(conv).values():
        cached = entry[-1]  # (key, weak references to the weights, the concatenated weight)
        assert not cached.requires_grad and not cached.is_inference()
    import copy

    copy.deepcopy(conv)  # the caches hold plain leaf tensors
    kernels.clear_cache()


@needs_onednn
def test_cached_weights_are_dropped_when_the_mode_switches():
    """An update through .data does not bump the version counter; train()/eval() starts afresh,
    and in training mode nothing is cached (an EMA teacher updated through .data stays right)."""
    torch.manual_seed(0)
    conv = OctConv(2, 16, 16, 3, 0.5, 0.5, bias=True).eval()
    x = _make_input(conv, 1, (8, 8))
    with torch.no_grad(), kernels.force(conv="onednn_packed", low="cat"):
        conv(x)
        for p in conv.parameters():
            p.data.mul_(-0.5)  # no version bump
        conv.train()
        for p in conv.parameters():
            p.data.mul_(3.0)  # in training mode: no cached copy to go stale
        _assert_same(conv(x), conv.forward_reference(x), atol=1e-4)
        conv.eval()
        _assert_same(conv(x), conv.forward_reference(x), atol=1e-4)
    assert "onednn_packed" not in kernels.conv_kernels(x.high, conv.h2h.weight, (1, 1), (1, 1), 1, plain=True,
                                                        cache_weights=False)
    kernels.clear_cache()


@needs_onednn
@pytest.mark.parametrize("plan", ["cat", "split"])
def test_clear_cache_after_a_data_update_in_eval_mode_serves_the_new_weights(plan):
    """docs/speed.md's recipe for a model kept in eval mode whose weights change through .data
    (an EMA teacher): clear_cache() drops the packed and the concatenated weights."""
    torch.manual_seed(0)
    conv = OctConv(2, 16, 16, 3, 0.5, 0.5).eval()
    x = _make_input(conv, 1, (16, 16))
    with torch.inference_mode(), kernels.force(conv="onednn_packed", low=plan, high=plan):
        for _ in range(3):
            conv(x)
        for p in conv.parameters():
            p.data.mul_(0.5)  # no version bump
        kernels.clear_cache()
        _assert_same(conv(x), conv.forward_reference(x), atol=1e-5)
    kernels.clear_cache()


@needs_onednn
def test_cached_weights_are_never_served_to_other_tensors():
    """torch.func.functional_call swaps in fresh weights each call; a fresh tensor may reuse a freed
    one's memory at the same version (0), which a (version, pointer) key alone would take for it."""
    torch.manual_seed(0)
    conv = OctConv(2, 16, 16, 3, 0.5, 0.5, bias=True).eval()
    x = _make_input(conv, 2, (8, 8))
    shapes = {name: p.shape for name, p in conv.named_parameters()}
    with torch.no_grad(), kernels.force(conv="onednn_packed", low="cat", high="cat"):
        for i in range(12):
            params = {name: torch.full(shape, (i + 1) / 100) for name, shape in shapes.items()}
            out = torch.func.functional_call(conv, params, (x,))
            conv.load_state_dict(params)
            _assert_same(out, conv.forward_reference(x))
            del params, out
    kernels.clear_cache()


@needs_onednn
def test_inference_and_shared_weights_are_not_cached():
    """Weights made under inference_mode have no version counter; weights in shared memory are
    written by other processes (Hogwild) without bumping this one's: neither may be cached."""
    torch.manual_seed(0)
    with torch.inference_mode():
        conv = OctConv(2, 16, 16, 3, 0.5, 0.5).eval()  # inference-tensor weights
        x = _make_input(conv, 1, (8, 8))
        assert conv.h2l.weight.is_inference()
        for plan in ("cat", "split"):
            with kernels.force(conv="onednn_packed", low=plan, high=plan):
                _assert_same(conv(x), conv.forward_reference(x))
    conv = OctConv(2, 16, 16, 3, 0.5, 0.5).eval().share_memory()
    x = _make_input(conv, 1, (8, 8))
    assert not kernels.cacheable(conv.h2l.weight)
    with torch.no_grad(), kernels.force(conv="onednn_packed", low="cat", high="cat"):
        conv(x)
        for p in conv.parameters():
            p.data.mul_(2.0)  # as another process would write it: no version bump here
        _assert_same(conv(x), conv.forward_reference(x))
    assert not kernels.layer_cache(conv)
    kernels.clear_cache()


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize(("dims", "octave", "size", "channels_last"), [
    (1, "spatial", (13,), False),
    (2, "spatial", (9, 8), True),
    (3, "spatiotemporal", (8, 9, 8), False),
    (3, "spatial", (3, 8, 9), True),
])
@pytest.mark.parametrize(("alpha_in", "alpha_out", "stride"), [(0.5, 0.5, 1), (0.5, 0.5, 2), (0.0, 0.5, 1),
                                                               (0.5, 0.0, 2)])
@pytest.mark.parametrize("plan", ["cat", "split"])
def test_padding_modes_equal_the_reference_in_values_gradients_and_layout(padding_mode, dims, octave, size,
                                                                           channels_last, alpha_in, alpha_out,
                                                                           stride, plan):
    torch.manual_seed(0)
    layout = {2: torch.channels_last, 3: torch.channels_last_3d}[dims] if channels_last else None
    conv = OctConv(dims, 8, 8, 3, alpha_in, alpha_out, stride=stride, bias=True, octave=octave,
                   padding_mode=padding_mode)
    assert all(p.padding_mode == padding_mode for p in conv.children())
    x = _make_input(conv, 2, size, memory_format=layout)
    with kernels.force(low=plan, high=plan):
        _check_against_reference(conv, x, layout_of_input=True)
        conv.eval()
        with torch.no_grad():
            _assert_same(conv(x), conv.forward_reference(x), atol=1e-4)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("pool_first", [False, True])
def test_a_vanilla_layer_with_a_padding_mode_is_nn_convnd(padding_mode, pool_first):
    torch.manual_seed(0)
    conv = OctConv(2, 4, 6, 3, 0.0, 0.0, stride=2, padding_mode=padding_mode, pool_first=pool_first)
    plain = torch.nn.Conv2d(4, 6, 3, stride=1 if pool_first else 2, padding=1, padding_mode=padding_mode, bias=False)
    plain.weight.data.copy_(conv.h2h.weight)
    x = torch.randn(1, 4, 8, 10)
    want = plain(torch.nn.functional.avg_pool2d(x, 2) if pool_first else x)
    torch.testing.assert_close(conv(x), want)
    conv.eval()
    with torch.no_grad():
        torch.testing.assert_close(conv(x), want, atol=1e-5, rtol=1e-5)


def test_padding_mode_is_checked_and_reflect_names_the_map_it_cannot_pad():
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        OctConv(2, 8, 8, 3, padding_mode="mirror")
    conv = OctConv(2, 8, 8, 3, 0.0, 0.5, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"padding_mode='reflect'.*\(1, 1\)"):
        conv(torch.randn(1, 8, 2, 2))
    assert conv(torch.randn(1, 8, 4, 4)).low.shape[2:] == (2, 2)
    assert "padding_mode='reflect'" in repr(conv)
    # Only the maps a path really pads count: a strided vanilla layer pads the full map, and with
    # alpha_out=0 the low map feeds l2h, which does not pool it on the octave axes.
    vanilla = OctConv(2, 4, 4, 3, 0.0, 0.0, stride=2, padding_mode="reflect")
    plain = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="reflect", bias=False)
    plain.weight.data.copy_(vanilla.h2h.weight)
    x = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(vanilla(x), plain(x))
    last = OctConv(2, 8, 8, 3, 0.5, 0.0, stride=2, padding_mode="reflect")
    y = Octave(torch.randn(1, 4, 4, 4), torch.randn(1, 4, 2, 2))
    torch.testing.assert_close(last(y), last.forward_reference(y))


# ----------------------------------------------------------------------------- conv + upsampled add + ReLU
@pytest.mark.parametrize(("shape", "factors", "groups", "bias"), [
    ((1, 8, 12, 10), (2, 2), 1, True), ((2, 8, 8, 8), (2, 2), 2, False),
    ((1, 8, 4, 8, 6), (1, 2, 2), 1, True), ((1, 4, 4, 8, 6), (2, 2, 2), 1, False),
])
@pytest.mark.parametrize("plan", ["fused", "separate"])
def test_conv_add_upsampled_relu_equals_the_formula_in_values_and_layout(shape, factors, groups, bias, plan):
    import torch.nn.functional as F

    from oct3d.nn.octave import CHANNELS_LAST_FORMATS, upsample_to

    torch.manual_seed(0)
    dims = len(shape) - 2
    layout = CHANNELS_LAST_FORMATS[len(shape)]
    x = torch.randn(shape).contiguous(memory_format=layout)
    weight = torch.randn(6, shape[1] // groups, *(3,) * dims).contiguous(memory_format=layout)
    b = torch.randn(6) if bias else None
    small = torch.randn(shape[0], 6, *(n // f for n, f in zip(shape[2:], factors))).contiguous(memory_format=layout)
    conv = (F.conv2d, F.conv3d)[dims - 2]
    want = torch.relu(conv(x, weight, b, 1, 1, 1, groups) + upsample_to(small, factors, shape[2:]))
    with torch.no_grad(), kernels.force(conv_add_relu=plan):
        got = kernels.conv_add_upsampled_relu(x, weight, b, (1,) * dims, (1,) * dims, groups, small, factors)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert got.is_contiguous(memory_format=layout)
    # Under autograd (and on channels-first maps) it is the separate form, with its gradients.
    x.requires_grad_(True)
    out = kernels.conv_add_upsampled_relu(x, weight, b, (1,) * dims, (1,) * dims, groups, small, factors)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-5)
    assert out.requires_grad
    kernels.clear_cache()


def test_folded_octave_layer_fuses_its_high_branch_relu_into_the_convolution(monkeypatch):
    """conv -> BN -> ReLU folded in eval mode takes the fused high branch (timed against the separate
    one) and equals the three modules called one after another."""
    from oct3d.nn import OctBatchNorm, OctReLU, conv_norm

    torch.manual_seed(0)
    calls = []
    real = kernels.conv_add_upsampled_relu
    monkeypatch.setattr(kernels, "conv_add_upsampled_relu", lambda *a: calls.append(1) or real(*a))
    conv = OctConv(2, 16, 16, 3, 0.5, 0.5).eval()
    norm = OctBatchNorm(2, 16, 0.5).eval()
    for bn in (norm.bn_h, norm.bn_l):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    relu = OctReLU()
    x = _make_input(conv, 1, (12, 8), memory_format=torch.channels_last)
    with torch.no_grad():
        want = relu(norm(conv(x)))
        for plan in ("fused", "separate"):
            with kernels.force(conv_add_relu=plan):
                got = conv_norm(conv, norm, x, relu)
            _assert_same(got, want, atol=1e-5)
        got = conv_norm(conv, norm, x, relu)  # the timed choice
        _assert_same(got, want, atol=1e-5)
        assert conv_norm(conv, norm, x).high.min() < 0  # without ReLU, none is applied
    assert len(calls) == 3
    kernels.clear_cache()
