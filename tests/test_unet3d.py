"""Oct-UNet3d: any volume size in, the same size out; it trains; octave layers where promised."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layouts import assert_same_gradients, map_layouts

from oct3d.models import OctUNet3d, get_model, list_models, oct_unet3d
from oct3d.nn import Octave, OctConv
from oct3d.profiling import count_params

SIZE_CASES = [
    ((13, 21, 17), 0.5, "spatial"),
    ((13, 21, 17), 0.5, "spatiotemporal"),
    ((8, 9, 5), 0.3, "spatial"),
    ((8, 9, 5), 0.3, "spatiotemporal"),
    ((1, 3, 2), 0.5, "spatiotemporal"),
    ((6, 7, 6), 0.0, "spatial"),
]


@pytest.mark.parametrize(("size", "alpha", "octave"), SIZE_CASES)
def test_output_has_input_size(size, alpha, octave):
    torch.manual_seed(0)
    model = oct_unet3d(in_channels=2, num_classes=3, alpha=alpha, octave=octave, base_width=4, depth=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 2, *size))
    assert out.shape == (1, 3, *size)
    assert torch.isfinite(out).all()


def _sphere(shape: tuple[int, int, int]) -> torch.Tensor:
    axes = [torch.linspace(-1, 1, n) for n in shape]
    d, h, w = torch.meshgrid(*axes, indexing="ij")
    return (d**2 + h**2 + w**2 < 0.5).long()


@pytest.mark.parametrize("octave", ["spatial", "spatiotemporal"])
def test_trains_on_synthetic_volume(octave):
    torch.manual_seed(0)
    mask = _sphere((13, 21, 17)).unsqueeze(0)
    volume = (mask.float() + 0.3 * torch.randn(1, 13, 21, 17)).unsqueeze(1)
    model = oct_unet3d(alpha=0.5, octave=octave, base_width=4, depth=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        logits = model(volume)
        assert logits.shape == (1, 2, 13, 21, 17)
        loss = F.cross_entropy(logits, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is not None for p in model.parameters())


def test_octave_layers_where_promised():
    model = oct_unet3d(alpha=0.5, octave="spatiotemporal", base_width=8, depth=4).eval()
    first, head = model.encoder[0][0][0], model.head
    assert first.alpha_in == 0.0 and first.alpha_out == 0.5
    assert head.alpha_in == 0.5 and head.alpha_out == 0.0
    convs = [m for m in model.modules() if isinstance(m, OctConv)]
    assert all(not c.is_vanilla for c in convs)
    assert model.encoder[2][0][0].stride == (2, 2, 2)
    # Skip connections per branch: the decoder's first conv sees high+high and low+low.
    x = torch.randn(1, 1, 9, 11, 10)
    skips = []
    out = x
    with torch.no_grad():
        for level in model.encoder:
            out = level(out)
            skips.append(out)
        assert isinstance(out, Octave) and out.low.shape[2:] == (1, 1, 1)
        up = model.decoder[2](out, skips[2])
    assert up.high.shape == skips[2].high.shape and up.low.shape == skips[2].low.shape


def test_parameters_do_not_depend_on_alpha_or_mode():
    counts = {
        count_params(oct_unet3d(alpha=a, octave=o, base_width=8, depth=3))
        for a in (0.0, 0.25, 0.5) for o in ("spatial", "spatiotemporal")
    }
    assert len(counts) == 1


def test_registry_and_errors():
    assert "oct_unet3d" in list_models("segmentation")
    assert isinstance(get_model("oct_unet3d", base_width=4, depth=2), OctUNet3d)
    with pytest.raises(ValueError, match="depth"):
        oct_unet3d(depth=1)
    with pytest.raises(ValueError, match="octave"):
        oct_unet3d(octave="temporal")
    with pytest.raises(ValueError, match="alpha"):
        oct_unet3d(alpha=1.0)
    with pytest.raises(ValueError, match=r"\(N, 1, D, H, W\)"):
        oct_unet3d(base_width=4, depth=2)(torch.randn(1, 2, 4, 4, 4))


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_channels_last_runs_the_same_network(alpha):
    """On CPU the maps run channels_last_3d (from the first convolution on); values, gradients and
    the caller's layout of the logits are those of the channels-first network."""
    torch.manual_seed(0)
    fast = oct_unet3d(alpha=alpha, base_width=4, depth=3)
    plain = oct_unet3d(alpha=alpha, base_width=4, depth=3, channels_last=False)
    plain.load_state_dict(fast.state_dict())
    seen = []
    fast.decoder[0].register_forward_hook(
        lambda module, args, out: seen.append(set(map_layouts(out)) == {"channels_last"}))
    x = torch.randn(1, 1, 6, 16, 12)
    got, want = fast(x), plain(x)
    assert seen == [True]
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # BatchNorm over a one-volume batch of tiny maps amplifies the rounding of whichever kernels the
    # autotuner picked earlier in the process (one gradient element in 864 read 1.2e-3 off in a full run).
    assert_same_gradients(fast, got, plain, want, rtol=1e-3, atol=3e-3)
    with pytest.raises(TypeError, match="channels_last"):
        oct_unet3d(channels_last="yes")



def test_builder_arguments_fill_in_every_default():
    from oct3d.models import builder_arguments

    assert builder_arguments("oct_unet3d", {"alpha": 0.25}, omit=("in_channels", "num_classes")) == {
        "alpha": 0.25, "octave": "spatial", "base_width": 32, "depth": 4, "channels_last": None,
        "norm": "batch"}
    video = builder_arguments("oct_i3d_r50", {"base_width": 8}, omit=("num_classes",))
    assert video["depths"] == [3, 4, 6, 3] and video["base_width"] == 8 and "num_classes" not in video
    # Builders that pass **kwargs on to their class show (and record) the class's arguments too.
    image = builder_arguments("oct_resnet50", {"channels_last": False})
    assert image["channels_last"] is False and image["zero_init_residual"] is False and image["groups"] == 1
    assert "groups" not in builder_arguments("oct_resnext50_32x4d")  # fixed by that builder
    assert builder_arguments("oct_densenet121")["block_config"] == [6, 12, 24, 16]
    with pytest.raises(ValueError, match=r"takes no argument\(s\) \['chanels_last'\]"):
        builder_arguments("oct_resnet50", {"chanels_last": False})
    with pytest.raises(ValueError, match=r"oct_unet3d takes no argument\(s\) \['width'\]"):
        builder_arguments("oct_unet3d", {"width": 8})
    with pytest.raises(ValueError, match="unknown model"):
        builder_arguments("no_such_model")


def test_too_narrow_or_too_deep_for_the_volume_are_named():
    with pytest.raises(ValueError, match=r"base_width=1 leaves no low-frequency channels .* base_width >= 2"):
        oct_unet3d(1, 3, base_width=1)
    model = oct_unet3d(1, 3, base_width=2, depth=5)
    with pytest.raises(ValueError, match=r"too small for depth=5 in training: .* maps are \(1, 1, 1\)"):
        model(torch.randn(1, 1, 16, 16, 16))
    model(torch.randn(2, 1, 16, 16, 16)).sum().backward()  # two volumes: two values per channel
    oct_unet3d(1, 3, base_width=2, depth=4)(torch.randn(1, 1, 16, 16, 16)).sum().backward()
    assert model.eval()(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)  # eval mode has no such limit


def test_instance_norm_u_net_uses_per_sample_statistics_and_keeps_the_layout():
    """norm="instance": each volume normalised alone (its output does not depend on the batch), any alpha."""
    from oct3d.nn import OctBatchNorm, OctInstanceNorm

    torch.manual_seed(0)
    model = oct_unet3d(1, 3, alpha=0.5, base_width=8, depth=3, norm="instance")
    assert not any(isinstance(m, OctBatchNorm) for m in model.modules())
    assert sum(isinstance(m, OctInstanceNorm) for m in model.modules()) == 12
    a, b = torch.randn(1, 1, 16, 12, 8), torch.randn(1, 1, 16, 12, 8)
    together = model(torch.cat([a, b]))
    torch.testing.assert_close(together[:1], model(a), atol=1e-5, rtol=1e-4)  # training mode, batch of one
    together.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    seen = []
    model.encoder[1].register_forward_hook(lambda module, args, out: seen.extend(map_layouts(out)))
    model(a)
    assert seen == ["channels_last", "channels_last"]  # InstanceNorm's output is put back into the layout
    assert oct_unet3d(1, 3, alpha=0.0, base_width=8, depth=3, norm="instance")(a).shape == (1, 3, 16, 12, 8)
    # Per-sample statistics need two voxels per sample at the deepest level, whatever the batch size.
    with pytest.raises(ValueError, match=r"InstanceNorm needs more than one value per channel and sample"):
        oct_unet3d(1, 3, base_width=2, depth=5, norm="instance")(torch.randn(2, 1, 16, 16, 16))
    with pytest.raises(ValueError, match=r"too small for depth=3: .*InstanceNorm"):  # eval mode too: no running stats
        oct_unet3d(1, 2, base_width=4, depth=3, norm="instance").eval()(torch.randn(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"norm must be one of \('batch', 'instance'\)"):
        oct_unet3d(norm="group")


def test_oct_instance_norm_normalises_each_branch_and_checks_its_input():
    from oct3d.nn import OctInstanceNorm

    norm = OctInstanceNorm(3, 8, alpha=0.5)
    high, low = torch.randn(2, 4, 4, 6, 6), torch.randn(2, 4, 4, 3, 3)
    out = norm(Octave(high, low))
    torch.testing.assert_close(out.high, F.instance_norm(high, weight=norm.in_h.weight, bias=norm.in_h.bias))
    torch.testing.assert_close(out.low, F.instance_norm(low, weight=norm.in_l.weight, bias=norm.in_l.bias))
    with pytest.raises(ValueError, match=r"OctInstanceNorm\(num_features=8, alpha=0.5\) expects channels"):
        norm(Octave(torch.randn(2, 5, 4, 6, 6), torch.randn(2, 3, 4, 3, 3)))
    assert OctInstanceNorm(3, 8, alpha=0.0)(high.repeat(1, 2, 1, 1, 1)).shape == (2, 8, 4, 6, 6)
