"""The README's conversion table: multiply-adds of ``octavize(model, alpha)`` relative to the original.

``python -m oct3d.convert.table [--alpha 0.5] [--models resnet50 unet ...]`` converts each model with a
small example input (the placement does not depend on its size) and counts multiply-adds
(``oct3d.profiling.count_macs``, convolutions and linear layers) at the model's usual input size,
printing a Markdown table. Counting at full size takes a few minutes on a laptop CPU for all models.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from oct3d.convert.api import octavize
from oct3d.profiling import count_macs

__all__ = ["MODELS", "TableModel", "mac_ratio", "main", "markdown"]


@dataclass(frozen=True)
class TableModel:
    """One row of the table: how to build the model, its example and counting inputs, its octave mode."""

    build: Callable[[], nn.Module]
    example: tuple[int, ...]
    full: tuple[int, ...]
    octave: str = "spatial"
    note: str = ""


def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(**kwargs)

    return build


def _tv_video(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models.video, name)()

    return build


def _ptv(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pytorchvideo.models import hub

            return getattr(hub, name)(pretrained=False)

    return build


def _monai(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from monai.networks import nets

        return getattr(nets, name)(**kwargs)

    return build


def _readme_segnet() -> nn.Module:
    from oct3d.convert.examples import TinySegNet

    return TinySegNet()


MODELS: dict[str, TableModel] = {
    "resnet18": TableModel(_tv("resnet18"), (1, 3, 64, 64), (1, 3, 224, 224)),
    "resnet50": TableModel(_tv("resnet50"), (1, 3, 64, 64), (1, 3, 224, 224)),
    "resnext50_32x4d": TableModel(_tv("resnext50_32x4d"), (1, 3, 64, 64), (1, 3, 224, 224)),
    "mobilenet_v2": TableModel(_tv("mobilenet_v2"), (1, 3, 64, 64), (1, 3, 224, 224)),
    "densenet121": TableModel(_tv("densenet121"), (1, 3, 64, 64), (1, 3, 224, 224)),
    "efficientnet_b0": TableModel(_tv("efficientnet_b0"), (1, 3, 64, 64), (1, 3, 224, 224)),
    "r3d_18": TableModel(_tv_video("r3d_18"), (1, 3, 8, 32, 32), (1, 3, 16, 112, 112), "spatiotemporal"),
    # pytorchvideo's hub heads pool a fixed 7x7 window: these convert at their full input size.
    "i3d_r50": TableModel(_ptv("i3d_r50"), (1, 3, 8, 224, 224), (1, 3, 8, 224, 224), note="pytorchvideo"),
    "slow_r50": TableModel(_ptv("slow_r50"), (1, 3, 8, 224, 224), (1, 3, 8, 224, 224), note="pytorchvideo"),
    "monai UNet": TableModel(
        _monai("UNet", spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
               strides=(2, 2, 2, 2), num_res_units=2),
        (1, 1, 32, 32, 32), (1, 1, 96, 96, 96), note="channels 16..256, 2 residual units",
    ),
    "monai BasicUNet": TableModel(
        _monai("BasicUNet", spatial_dims=3, in_channels=1, out_channels=2), (1, 1, 32, 32, 32), (1, 1, 96, 96, 96),
        note="default features",
    ),
    "monai SegResNet": TableModel(
        _monai("SegResNet", spatial_dims=3, init_filters=16, in_channels=1, out_channels=2), (1, 1, 32, 32, 32),
        (1, 1, 96, 96, 96), note="init_filters 16",
    ),
    "monai DynUNet": TableModel(
        _monai("DynUNet", spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3, 3, 3, 3, 3],
               strides=[1, 2, 2, 2, 2], upsample_kernel_size=[2, 2, 2, 2]),
        (1, 1, 32, 32, 32), (1, 1, 96, 96, 96), note="5 levels (nnU-Net style)",
    ),
    "README TinySegNet": TableModel(_readme_segnet, (1, 1, 5, 32, 32), (1, 1, 37, 61, 53), note="odd volume"),
}


def mac_ratio(spec: TableModel, alpha: float = 0.5, full_size: bool = True) -> tuple[int, int]:
    """``(original MACs, converted MACs)`` of one table model, counted at its full (or example) size."""
    torch.manual_seed(0)
    model = spec.build().eval()
    converted = octavize(model, alpha, example_input=torch.randn(spec.example), octave=spec.octave, validate=False)
    size = spec.full if full_size else spec.example
    return count_macs(model, size), count_macs(converted.eval(), size)


def markdown(names: Sequence[str] | None = None, alpha: float = 0.5, full_size: bool = True) -> str:
    """The table as Markdown, one row per model (all of :data:`MODELS` by default)."""
    names = list(MODELS) if names is None else list(names)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {list(MODELS)}")
    lines = [
        f"| model | input | GMACs | GMACs at alpha {alpha:g} | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in names:
        spec = MODELS[name]
        original, converted = mac_ratio(spec, alpha, full_size)
        size = "x".join(str(n) for n in (spec.full if full_size else spec.example)[1:])
        notes = [n for n in (spec.note, spec.octave if spec.octave != "spatial" else "") if n]
        label = name + (f" ({', '.join(notes)})" if notes else "")
        ratio = converted / original
        lines.append(f"| {label} | {size} | {original / 1e9:.3f} | {converted / 1e9:.3f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: print the table."""
    parser = argparse.ArgumentParser(prog="python -m oct3d.convert.table", description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=0.5, help="ratio of low-frequency channels (default 0.5)")
    parser.add_argument("--models", nargs="*", default=None, help=f"subset of: {', '.join(MODELS)}")
    parser.add_argument("--example-size", action="store_true", help="count at the small example size (fast)")
    args = parser.parse_args(argv)
    print(markdown(args.models, args.alpha, full_size=not args.example_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
