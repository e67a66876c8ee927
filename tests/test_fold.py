"""Run-time BatchNorm folding (``oct3d.nn.fold.conv_norm``) equals conv -> BatchNorm -> ReLU, and
falls back to the modules wherever folding would change what runs or what is seen."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oct3d.nn import Octave, OctBatchNorm, OctConv, OctReLU
from oct3d.nn.fold import conv_norm


def _randomise(norm: OctBatchNorm) -> None:
    for bn in (norm.bn_h, norm.bn_l):
        if bn is not None:
            with torch.no_grad():
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
                if bn.weight is not None:
                    bn.weight.normal_()
                    bn.bias.normal_()


def _layer(dims, cin, cout, a_in, a_out, stride=1, groups=1, bias=False, pool_first=False, affine=True):
    conv = OctConv(dims, cin, cout, 3, a_in, a_out, stride, groups=groups, bias=bias, pool_first=pool_first)
    norm = OctBatchNorm(dims, cout, a_out, affine=affine)
    _randomise(norm)
    return conv.eval(), norm.eval(), OctReLU(inplace=True)


def _input(dims, channels, alpha, channels_last, size=8):
    spatial = (size,) * dims
    high_c = channels - int(alpha * channels)
    high = torch.randn(2, high_c, *spatial)
    # (3D maps in the default "spatial" octave: the low branch halves H and W only)
    low_spatial = spatial[:1] + tuple(s // 2 for s in spatial[1:]) if dims == 3 else tuple(s // 2 for s in spatial)
    low = torch.randn(2, channels - high_c, *low_spatial) if alpha else None
    if channels_last:
        fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
        high = high.to(memory_format=fmt)
        low = None if low is None else low.to(memory_format=fmt)
    return high if low is None else Octave(high, low)


def _branches(out):
    return (out.high, out.low) if isinstance(out, Octave) else (out, None)


def _assert_same(folded, reference):
    for f, r in zip(_branches(folded), _branches(reference)):
        assert (f is None) == (r is None)
        if f is not None:
            torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)
            for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
                if f.dim() == {torch.channels_last: 4, torch.channels_last_3d: 5}.get(fmt, f.dim()):
                    assert f.is_contiguous(memory_format=fmt) == r.is_contiguous(memory_format=fmt)


CASES = [
    # dims, in, out, alpha_in, alpha_out, stride, groups, bias, pool_first
    (2, 16, 16, 0.5, 0.5, 1, 1, False, False),
    (2, 16, 32, 0.5, 0.5, 2, 1, False, False),
    (2, 3, 16, 0.0, 0.5, 1, 1, True, False),
    (2, 16, 8, 0.5, 0.0, 1, 1, True, False),
    (2, 16, 16, 0.0, 0.0, 2, 1, False, False),
    (2, 16, 16, 0.0, 0.0, 2, 1, True, True),
    (2, 16, 16, 0.5, 0.5, 1, 16, True, False),
    (2, 16, 16, 0.5, 0.5, 1, 2, False, False),
    (3, 8, 16, 0.5, 0.5, 2, 1, False, False),
    (3, 8, 8, 0.5, 0.5, 1, 1, True, False),
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_relu", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_folded_equals_conv_norm_relu(case, with_relu, channels_last):
    dims, cin, cout, a_in, a_out, stride, groups, bias, pool_first = case
    torch.manual_seed(0)
    conv, norm, relu = _layer(dims, cin, cout, a_in, a_out, stride, groups, bias, pool_first)
    x = _input(dims, cin, a_in, channels_last)
    relu = relu if with_relu else None
    with torch.no_grad():
        reference = norm(conv(x))
        if relu is not None:
            reference = relu(reference)
        folded = conv_norm(conv, norm, x, relu)
    _assert_same(folded, reference)


def _count_norm_calls(monkeypatch):
    calls = []
    real = OctBatchNorm.forward
    monkeypatch.setattr(OctBatchNorm, "forward", lambda self, x: calls.append(1) or real(self, x))
    return calls


def test_folding_skips_the_norm_call_only_in_eval_inference(monkeypatch):
    torch.manual_seed(0)
    conv, norm, relu = _layer(2, 16, 16, 0.5, 0.5)
    x = _input(2, 16, 0.5, True)
    with torch.no_grad():
        calls = _count_norm_calls(monkeypatch)
        conv_norm(conv, norm, x, relu)
        assert calls == []  # folded: the BatchNorm's forward never ran
    conv_norm(conv, norm, x, relu)  # autograd on: the modules as written
    assert calls == [1]
    conv.train()
    norm.train()
    with torch.no_grad():
        conv_norm(conv, norm, x, relu)
    assert calls == [1, 1]


def test_a_hook_sees_its_module_called():
    torch.manual_seed(0)
    conv, norm, relu = _layer(2, 16, 16, 0.5, 0.5)
    x = _input(2, 16, 0.5, True)
    for module in (conv, norm, norm.bn_h, relu, relu.module, conv.h2h):
        seen = []
        handle = module.register_forward_hook(lambda *_, seen=seen: seen.append(1))
        with torch.no_grad():
            conv_norm(conv, norm, x, relu)
        handle.remove()
        assert seen, type(module).__name__


def test_cached_weights_follow_every_change():
    torch.manual_seed(0)
    conv, norm, relu = _layer(2, 16, 16, 0.5, 0.5, bias=True)
    x = _input(2, 16, 0.5, True)

    def check():
        with torch.no_grad():
            _assert_same(conv_norm(conv, norm, x, relu), relu(norm(conv(x))))

    check()
    with torch.no_grad():
        conv.h2h.weight.mul_(2)  # in place: bumps the version counter
    check()
    conv.l2h.weight = nn.Parameter(torch.randn_like(conv.l2h.weight))  # swapped
    check()
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in norm.state_dict().items()}
    state = {k: v.abs() + 0.1 if "running_var" in k else v for k, v in state.items()}
    norm.load_state_dict(state)  # running statistics replaced
    check()
    norm.bn_l.register_buffer("running_mean", torch.randn(norm.low_channels))  # buffer swapped
    check()
    norm.bn_h.eps = 0.5
    check()


def test_untracked_statistics_and_inference_tensors_are_not_folded(monkeypatch):
    torch.manual_seed(0)
    x = _input(2, 16, 0.5, False)
    conv = OctConv(2, 16, 16, 3, 0.5, 0.5).eval()
    norm = OctBatchNorm(2, 16, 0.5, track_running_stats=False).eval()  # batch statistics in eval mode too
    calls = _count_norm_calls(monkeypatch)
    with torch.no_grad():
        _assert_same(conv_norm(conv, norm, x), norm(conv(x)))
    assert len(calls) == 2
    with torch.inference_mode():  # weights made here have no version counter to check a cache against
        conv, norm, _ = _layer(2, 16, 16, 0.5, 0.5)
        calls.clear()
        _assert_same(conv_norm(conv, norm, x), norm(conv(x)))
    assert len(calls) == 2


def test_weights_made_outside_inference_mode_fold_inside_it():
    torch.manual_seed(0)
    conv, norm, relu = _layer(2, 16, 16, 0.5, 0.5)
    x = _input(2, 16, 0.5, True)
    with torch.no_grad():
        reference = relu(norm(conv(x)))
    with torch.inference_mode():
        _assert_same(conv_norm(conv, norm, x, relu), reference)
        _assert_same(conv_norm(conv, norm, x, relu), reference)


def test_other_modules_run_as_written():
    conv, bn = nn.Conv2d(3, 4, 3, padding=1).eval(), nn.BatchNorm2d(4).eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(conv_norm(conv, bn, x, nn.ReLU()), torch.relu(bn(conv(x))))


@pytest.mark.parametrize("builder, kwargs, shape", [
    ("oct_resnet50", {"width_per_group": 8, "num_classes": 5}, (2, 3, 32, 32)),
    ("oct_mobilenet_v1", {"width_mult": 0.25, "num_classes": 5}, (1, 3, 32, 32)),
    ("oct_i3d_r50", {"base_width": 8, "num_classes": 5}, (1, 3, 4, 32, 32)),
    ("oct_r3d_18", {"base_width": 8, "num_classes": 5}, (1, 3, 4, 32, 32)),
    ("oct_unet3d", {"base_width": 8}, (1, 1, 16, 16, 8)),
])
def test_models_fold_in_inference_and_match_their_unfolded_outputs(builder, kwargs, shape, monkeypatch):
    from oct3d import models

    torch.manual_seed(0)
    model = getattr(models, builder)(**kwargs)
    for module in model.modules():
        if isinstance(module, OctBatchNorm):
            _randomise(module)
    model.eval()
    x = torch.randn(shape)
    reference = model(x)  # autograd on: every BatchNorm runs
    calls = _count_norm_calls(monkeypatch)
    with torch.no_grad():
        folded = model(x)
    assert calls == []
    torch.testing.assert_close(folded, reference.detach(), atol=1e-4, rtol=1e-4)


def test_fx_tracing_records_one_call_with_the_modules_as_attributes():
    torch.manual_seed(0)
    conv, norm, relu = _layer(2, 16, 16, 0.5, 0.5)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.relu = conv, norm, relu

        def forward(self, x):
            return conv_norm(self.conv, self.norm, x, self.relu)

    block = Block()
    with torch.no_grad():
        graph = torch.fx.symbolic_trace(block)
    calls = [n for n in graph.graph.nodes if n.op == "call_function" and n.target is conv_norm]
    assert len(calls) == 1 and not any(n.op == "call_module" for n in graph.graph.nodes)
    assert [a.target for a in calls[0].args if isinstance(a, torch.fx.Node) and a.op == "get_attr"] == [
        "conv", "norm", "relu"]
    x = _input(2, 16, 0.5, True)
    with torch.no_grad():
        _assert_same(graph(x), block(x))


@pytest.mark.parametrize("name, shape", [("resnet18", (2, 3, 64, 64)), ("r3d_18", (1, 3, 4, 32, 32))])
def test_octavize_fold_norms_routes_each_chain_and_keeps_the_network(name, shape, monkeypatch, tmp_path):
    import copy

    import torchvision

    from oct3d import fuse, octavize

    torch.manual_seed(0)
    vanilla = torchvision.models.video.r3d_18(num_classes=5) if name == "r3d_18" else \
        torchvision.models.resnet18(num_classes=5)
    for module in vanilla.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(shape)
    plain = octavize(vanilla, 0.5, example_input=x).eval()
    routed = octavize(vanilla, 0.5, example_input=x, fold_norms=True).eval()
    calls = [n for n in routed.graph.nodes if n.op == "call_function" and n.target is conv_norm]
    chains = sum(isinstance(m, OctBatchNorm) for m in routed.modules())
    assert len(calls) == chains > 0  # every octave BatchNorm follows its convolution in these networks
    assert routed.state_dict().keys() == plain.state_dict().keys()
    reference = plain(x).detach()
    norm_calls = _count_norm_calls(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(routed(x), reference, atol=1e-4, rtol=1e-4)
        assert norm_calls == []  # folded
        for other in (copy.deepcopy(routed), fuse(routed)):
            torch.testing.assert_close(other(x), reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(routed(x), reference, atol=1e-5, rtol=1e-5)  # autograd on: the modules
    torch.save(routed, tmp_path / "routed.pt")
    loaded = torch.load(tmp_path / "routed.pt", weights_only=False)  # a GraphModule re-traces its code
    assert sum(n.target is conv_norm for n in loaded.graph.nodes if n.op == "call_function") == chains
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference, atol=1e-4, rtol=1e-4)
        exported = torch.export.export(routed, (x,)).module()
        torch.testing.assert_close(exported(x), reference, atol=1e-4, rtol=1e-4)


def test_octavize_fold_norms_must_be_a_bool():
    from oct3d import octavize

    with pytest.raises(TypeError, match="fold_norms must be a bool"):
        octavize(nn.Sequential(nn.Conv2d(3, 8, 3)), 0.5, example_input=torch.randn(1, 3, 8, 8), fold_norms="yes")
