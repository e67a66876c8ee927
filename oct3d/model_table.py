"""Cost table of the registered models: GMACs, parameters and activation memory against alpha.

``python tools/model_table.py [--task image|video|all] [--alphas ...] [--markdown] [--plot FILE.png]``
(also ``oct3d table``). Every model is built on the ``meta`` device, so the table costs no
compute and no memory: multiply-adds come from ``torch.utils.flop_counter`` (divided by two,
the paper's "FLOPs"), activation memory is the bytes of every convolution's output in one
forward pass (``oct3d.profiling.activation_memory``, float32, batch 1), computed from shapes.

Input sizes: 224x224 images; 8x224x224 clips; 16x112x112 for the R3D family; a 64^3 volume
for the segmentation U-Net. Each octave model sits next to its vanilla peer (torchvision or
pytorchvideo; the octave builder at ``alpha=0`` where no library model exists), and the
``vs vanilla`` columns divide by the peer's figure.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass

import torch
from torch import nn

from oct3d.inference import check_output_file
from oct3d.models import get_model, list_models, model_task
from oct3d.profiling import measure

__all__ = [
    "DEFAULT_ALPHAS",
    "CostRow",
    "build_octave",
    "cost_rows",
    "format_table",
    "input_size",
    "main",
    "plot_costs",
    "peer_label",
    "vanilla_peer",
]

DEFAULT_ALPHAS = (0.0, 0.125, 0.25, 0.5, 0.75)


def _torchvision(name: str, **kwargs) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(num_classes=num_classes, **kwargs)

    return build


def _torchvision_video(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models.video, name)(num_classes=num_classes)

    return build


def _pytorchvideo(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from pytorchvideo.models.hub import resnet as hub

        # Never pretrained: the peer is only timed and counted, and there is no network here.
        return getattr(hub, name)(pretrained=False, model_num_class=num_classes)

    return build


#: octave model -> (label of its vanilla peer, builder of the peer taking ``num_classes``).
_PEERS: dict[str, tuple[str, Callable[[int], nn.Module]]] = {
    "oct_resnet50": ("torchvision resnet50", _torchvision("resnet50")),
    "oct_resnet101": ("torchvision resnet101", _torchvision("resnet101")),
    "oct_resnet152": ("torchvision resnet152", _torchvision("resnet152")),
    "oct_resnext50_32x4d": ("torchvision resnext50_32x4d", _torchvision("resnext50_32x4d")),
    "oct_mobilenet_v2": ("torchvision mobilenet_v2", _torchvision("mobilenet_v2")),
    "oct_densenet121": ("torchvision densenet121", _torchvision("densenet121")),
    "oct_i3d_r50": ("pytorchvideo i3d_r50", _pytorchvideo("i3d_r50")),
    "oct_c2d_r50": ("pytorchvideo c2d_r50", _pytorchvideo("c2d_r50")),
    "oct_slow_r50": ("pytorchvideo slow_r50", _pytorchvideo("slow_r50")),
    "oct_r3d_18": ("torchvision r3d_18", _torchvision_video("r3d_18")),
}


def num_classes_of(name: str) -> int:
    """Classifier size the paper uses: 1000 (ImageNet) for images, 400 (Kinetics) for video."""
    return {"image": 1000, "video": 400}.get(model_task(name), 2)


def input_size(name: str, batch: int = 1, frames: int | None = None, size: int | None = None) -> tuple[int, ...]:
    """Input shape of model ``name``: ``(batch, 3, 224, 224)`` for images, ``(batch, 3, 8, 224, 224)``
    for clips (R3D: 16x112x112), ``(batch, 1, 64, 64, 64)`` for the U-Net; ``frames``/``size`` override."""
    task = model_task(name)
    if task == "image":
        side = size or 224
        return (batch, 3, side, side)
    if task == "video":
        default_frames, default_side = (16, 112) if name.startswith("oct_r3d") else (8, 224)
        side = size or default_side
        return (batch, 3, frames or default_frames, side, side)
    side = size or 64
    return (batch, 1, frames or side, side, side)


def build_octave(name: str, alpha: float, octave: str | None = None, **kwargs) -> nn.Module:
    """Build the registered octave model ``name`` at ``alpha`` (and ``octave`` mode for 3D models)."""
    options = {"alpha": alpha, **kwargs}
    if model_task(name) != "segmentation":
        options.setdefault("num_classes", num_classes_of(name))
    if octave is not None and model_task(name) != "image":
        options["octave"] = octave
    return get_model(name, **options)


def peer_label(name: str) -> str:
    """Name of the vanilla network ``name`` is compared with (without building it)."""
    return _PEERS[name][0] if name in _PEERS else f"{name} alpha=0"


def vanilla_peer(name: str, num_classes: int | None = None) -> tuple[str, nn.Module]:
    """``(label, model)`` of the vanilla network ``name`` is compared with.

    torchvision / pytorchvideo models where one exists (resnet50 for oct_resnet50, i3d_r50
    for oct_i3d_r50, ...), else the octave builder itself at ``alpha=0``, which is the
    vanilla architecture by construction.
    """
    if name in _PEERS:
        return peer_label(name), _PEERS[name][1](num_classes or num_classes_of(name))
    model = build_octave(name, 0.0, **({} if num_classes is None else {"num_classes": num_classes}))
    return peer_label(name), model


@dataclass(frozen=True)
class CostRow:
    """One line of the table: a model (or its vanilla peer) at one alpha and octave mode."""

    model: str
    octave: str
    alpha: float | None  # None for the vanilla peer
    input_size: tuple[int, ...]
    macs: int | None  # None (with params and activation_bytes): the model does not exist at this alpha
    params: int | None
    activation_bytes: int | None
    peer_macs: int
    peer_activation_bytes: int
    note: str = ""  # why the model does not exist at this alpha

    @property
    def available(self) -> bool:
        """Whether the model exists at this alpha (grouped layers need every branch divisible by the groups)."""
        return self.macs is not None

    @property
    def gmacs(self) -> float:
        """Multiply-adds, in billions."""
        return self.macs / 1e9

    @property
    def mac_ratio(self) -> float:
        """Multiply-adds relative to the vanilla peer."""
        return self.macs / self.peer_macs

    @property
    def memory_ratio(self) -> float:
        """Activation memory relative to the vanilla peer."""
        return self.activation_bytes / self.peer_activation_bytes


def cost_rows(
    names: Sequence[str],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    octaves: Sequence[str] = ("spatial", "spatiotemporal"),
) -> list[CostRow]:
    """The table: for every model, its vanilla peer's row, then one row per alpha (and octave
    mode for 3D models), each counted on the meta device at :func:`input_size`."""
    rows = []
    for name in names:
        size = input_size(name)
        with torch.device("meta"):
            label, peer = vanilla_peer(name)
        peer_macs, peer_params, peer_bytes = astuple(measure(peer, size))
        rows.append(CostRow(label, "-", None, size, peer_macs, peer_params, peer_bytes, peer_macs, peer_bytes))
        modes = ("spatial",) if model_task(name) == "image" else tuple(octaves)
        for octave in modes:
            for alpha in alphas:
                try:
                    with torch.device("meta"):
                        model = build_octave(name, alpha, octave)
                except ValueError as error:  # e.g. ResNeXt's 32 groups cannot split alpha=.125's branches
                    rows.append(CostRow(name, octave, float(alpha), size, None, None, None, peer_macs, peer_bytes,
                                        note=str(error)))
                    continue
                macs, params, act = astuple(measure(model, size))
                rows.append(CostRow(name, octave, float(alpha), size, macs, params, act, peer_macs, peer_bytes))
    return rows


def format_table(rows: Sequence[CostRow], markdown: bool = True) -> str:
    """Rows as a markdown table (or aligned plain text with ``markdown=False``)."""
    header = ["model", "octave", "alpha", "input", "GMACs", "MACs vs vanilla", "params (M)", "act. memory (MB)",
              "memory vs vanilla"]
    body = []
    for r in rows:
        alpha = "vanilla" if r.alpha is None else f"{r.alpha:g}"
        first = [r.model, r.octave, alpha, "x".join(map(str, r.input_size[2:]))]
        if not r.available:
            body.append([*first, *(["n/a"] * 5)])
            continue
        body.append([
            *first, f"{r.gmacs:.2f}", f"{r.mac_ratio:.2f}", f"{r.params / 1e6:.2f}",
            f"{r.activation_bytes / 2**20:.1f}", f"{r.memory_ratio:.2f}",
        ])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *body)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)) for cells in [header, *body])


def plot_costs(rows: Sequence[CostRow], path: str) -> None:
    """PNG of cost against alpha (paper Figure 4, cost axis only): GMACs, and MACs and activation
    memory relative to the vanilla peer, one line per model and octave mode."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    series: dict[str, list[CostRow]] = {}
    for r in rows:
        if r.alpha is not None and r.available:
            key = r.model if len(r.input_size) == 4 else f"{r.model} ({r.octave})"
            series.setdefault(key, []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for key, points in series.items():
        alphas = [p.alpha for p in points]
        axes[0].plot(alphas, [p.gmacs for p in points], marker="o", label=key)
        axes[1].plot(alphas, [p.mac_ratio for p in points], marker="o", label=key)
        axes[2].plot(alphas, [p.memory_ratio for p in points], marker="o", label=key)
    grid = [i / 100 for i in range(0, 96)]
    axes[1].plot(grid, [(1 - a) ** 2 + a * (1 - a) / 2 + a * a / 4 for a in grid], "k--", lw=1,
                 label="one layer, 2D (paper Table 1)")
    axes[2].plot(grid, [(1 - a) + a / 4 for a in grid], "k--", lw=1, label="one layer, 2D (paper Table 1)")
    for ax, title in zip(axes, ("GMACs", "MACs / vanilla", "activation memory / vanilla")):
        ax.set_xlabel("alpha (fraction of low-frequency channels)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _models_for(task: str) -> list[str]:
    if task == "all":
        return list_models("image") + list_models("video") + list_models("segmentation")
    return list_models(task)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of the table tool."""
    parser = argparse.ArgumentParser(prog="oct3d table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("image", "video", "segmentation", "all"), default="all")
    parser.add_argument("--models", nargs="+", help="only these registered models (default: every model of --task)")
    parser.add_argument("--alphas", nargs="+", type=float, default=list(DEFAULT_ALPHAS))
    parser.add_argument("--octave", nargs="+", choices=("spatial", "spatiotemporal"),
                        default=["spatial", "spatiotemporal"], help="octave modes of the 3D models")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (default: plain text)")
    parser.add_argument("--output", help="also write the markdown table to this file")
    parser.add_argument("--plot", help="write a PNG of cost against alpha to this file")
    args = parser.parse_args(argv)
    for option in ("output", "plot"):
        if getattr(args, option):
            check_output_file(parser, f"--{option}", getattr(args, option))
    for alpha in args.alphas:
        if not 0.0 <= alpha < 1.0 or math.isnan(alpha):
            parser.error(f"--alphas must be in [0, 1), got {alpha}")
    if args.models:
        known = list_models()
        unknown = [m for m in args.models if m not in known]
        if unknown:
            parser.error(f"unknown model(s) {unknown}; known: {', '.join(known)}")
        other = [m for m in args.models if args.task != "all" and model_task(m) != args.task]
        if other:
            parser.error(f"--models {' '.join(other)}: not {args.task} model(s) (--task {args.task}); "
                         f"drop --task or choose among {', '.join(list_models(args.task))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/model_table.py`` and ``oct3d table``; returns the exit status."""
    args = parse_args(argv)
    names = args.models or _models_for(args.task)
    rows = cost_rows(names, args.alphas, args.octave)
    print(format_table(rows, markdown=args.markdown))
    for note in dict.fromkeys(f"{r.model} at alpha {r.alpha:g}: {r.note}" for r in rows if not r.available):
        print(f"n/a: {note}", file=sys.stderr)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(format_table(rows, markdown=True) + "\n")
    if args.plot:
        plot_costs(rows, args.plot)
        print(f"plot written to {args.plot}")
    return 0
