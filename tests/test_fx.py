"""torch.fx symbolic tracing of oct3d layers, of the builders' models and of converted networks.

fx's default tracer runs every module outside ``torch.nn`` on ``Proxy`` values; octave layers and
blocks record themselves as one ``call_module`` node instead (``oct3d.nn.octave.fx_leaf_forward``),
so ``fx.symbolic_trace`` and the tools built on it (torchvision's feature extraction) work on them.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import fx, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from oct3d import octavize
from oct3d.models import (
    oct_densenet121,
    oct_i3d_r50,
    oct_mobilenet_v1,
    oct_mobilenet_v2,
    oct_r3d_18,
    oct_resnet26,
    oct_unet3d,
)
from oct3d.nn import (
    Octave,
    OctAvgPool,
    OctBatchNorm2d,
    OctConv2d,
    OctDropout,
    OctGlobalAvgPool,
    OctMaxPool,
    OctReLU,
    kernels,
)
from oct3d.nn.transposed import OctConvTranspose


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def _traced_equals_eager(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    model.eval()
    traced = fx.symbolic_trace(model)
    with torch.no_grad(), kernels.force(conv="default", pool="avg_pool"):  # one kernel for both runs
        assert _same(traced(x), model(x))
    return traced


def test_a_network_of_octave_layers_traces_one_node_per_layer():
    torch.manual_seed(0)
    net = nn.Sequential(
        OctConv2d(3, 16, 3, alpha_in=0.0, alpha_out=0.5), OctBatchNorm2d(16, 0.5), OctReLU(), OctDropout(0.1),
        OctMaxPool(2, kernel_size=2), OctConvTranspose(2, 16, 8, 2, alpha_in=0.5, alpha_out=0.5, stride=2),
        OctAvgPool(2, kernel_size=2), OctConv2d(8, 8, 3, alpha_in=0.5, alpha_out=0.0), OctGlobalAvgPool(),
    )
    traced = _traced_equals_eager(net, torch.randn(2, 3, 20, 18))
    ops = [node.op for node in traced.graph.nodes]
    assert ops == ["placeholder"] + ["call_module"] * len(net) + ["output"]


def test_an_octave_pair_input_traces():
    net = nn.Sequential(OctConv2d(8, 8, 3), OctBatchNorm2d(8)).eval()
    traced = fx.symbolic_trace(net)
    x = Octave(torch.randn(1, 4, 10, 10), torch.randn(1, 4, 5, 5))
    assert _same(tuple(traced(x)), tuple(net(x)))


def test_tracing_a_lone_octave_layer_says_what_to_trace():
    with pytest.raises(TypeError, match=r"cannot trace OctConv2d on its own.*nn.Sequential"):
        fx.symbolic_trace(OctConv2d(8, 8, 3))


@pytest.mark.parametrize(
    ("builder", "shape"),
    [
        (lambda: oct_resnet26(num_classes=7), (1, 3, 64, 64)),
        (lambda: oct_densenet121(num_classes=7), (1, 3, 64, 64)),
        (lambda: oct_mobilenet_v1(num_classes=7), (1, 3, 64, 64)),
        (lambda: oct_mobilenet_v2(num_classes=7), (1, 3, 64, 64)),
        (lambda: oct_i3d_r50(num_classes=7, base_width=16), (1, 3, 8, 32, 32)),
        (lambda: oct_r3d_18(num_classes=7), (1, 3, 4, 32, 32)),
        (lambda: oct_unet3d(base_width=8), (1, 1, 12, 20, 18)),
    ],
    ids=["resnet26", "densenet121", "mobilenet_v1", "mobilenet_v2", "i3d_r50", "r3d_18", "unet3d"],
)
def test_the_builders_models_trace(builder, shape):
    torch.manual_seed(0)
    _traced_equals_eager(builder(), torch.randn(shape))


def test_unet_traced_keeps_the_callers_layout():
    net = oct_unet3d(base_width=8, num_classes=3).eval()
    traced = fx.symbolic_trace(net)
    with torch.no_grad():
        out = traced(torch.randn(1, 1, 8, 16, 16))
    assert out.is_contiguous()


def test_feature_extraction_from_a_builders_model():
    model = oct_resnet26(num_classes=5).eval()
    extractor = create_feature_extractor(model, {"layer2": "mid", "layer4": "last"})
    with torch.no_grad():
        features = extractor(torch.randn(2, 3, 64, 64))
    assert isinstance(features["mid"], Octave)  # layer2 ends on an octave map
    assert features["mid"].high.shape == (2, 256, 8, 8) and features["mid"].low.shape == (2, 256, 4, 4)
    assert features["last"].shape == (2, 2048, 2, 2)


def test_a_converted_network_retraces_and_feeds_feature_extraction():
    torch.manual_seed(0)
    net = octavize(torchvision.models.resnet18(num_classes=5), alpha=0.5, example_input=torch.randn(1, 3, 64, 64))
    _traced_equals_eager(net, torch.randn(2, 3, 64, 64))
    names = get_graph_node_names(net)[1]
    assert "layer2.0.conv1" in names and "layer4.1.relu_1" in names
    extractor = create_feature_extractor(net, {"layer2.0.conv1": "octave", "layer4.1.relu_1": "plain"})
    with torch.no_grad():
        features = extractor(torch.randn(2, 3, 64, 64))
    assert isinstance(features["octave"], Octave) and features["octave"].low.shape == (2, 64, 4, 4)
    assert features["plain"].shape == (2, 512, 2, 2)
