"""Wall-clock benchmark: octave models against their vanilla peers, side by side in one process.

``python tools/benchmark.py --model oct_resnet50 --alphas 0.25 0.5 0.75`` (also ``oct3d bench``)
builds the octave model at each alpha and its vanilla peer (torchvision / pytorchvideo, the
same peers as ``tools/model_table.py``), warms every model up, then times them *interleaved*
(round-robin, one call each per round) so that load changes on the machine hit all models
alike. It reports medians of inference and of a training step (forward, backward, SGD step;
the multi-tensor SGD on CPU, as oct3d's trainer runs it), throughput, peak memory, the
measured time ratio octave/vanilla and, beside it, the multiply-add ratio (the ideal a
perfect implementation would reach).

Peak memory is the peak of tensor memory one step allocates on top of what was live
before it (weights, inputs, optimizer state): ``torch.cuda.max_memory_allocated`` on CUDA,
the profiler's allocation events on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from oct3d.model_table import build_octave, input_size, peer_label, vanilla_peer
from oct3d.models.registry import list_models, model_task
from oct3d.profiling import count_macs
from oct3d.system import foreach_kwargs, steady_malloc

__all__ = ["BenchResult", "benchmark_models", "cpu_name", "format_results", "main", "op_table", "plot_results",
           "json_table", "results_to_json", "route_conv3d_like_octave", "route_convs_like_octave", "steady_malloc"]

MODES = ("inference", "train")


@dataclass
class BenchResult:
    """Timings of one model at one setting, with the matching vanilla peer's figures."""

    model: str
    alpha: float | None
    octave: str | None
    mode: str
    batch: int
    shape: tuple[int, ...]
    median_ms: float
    peer_median_ms: float
    macs: int
    peer_macs: int
    peak_bytes: int | None
    peer_peak_bytes: int | None
    #: Median over rounds of (octave time / peer time) within each round; None: ratio of the medians.
    round_ratio: float | None = None

    @property
    def time_ratio(self) -> float:
        """Octave / vanilla time: the median of the per-round ratios (robust to load drifting
        between rounds), else the ratio of the medians."""
        if self.round_ratio is not None:
            return self.round_ratio
        return self.median_ms / self.peer_median_ms

    @property
    def mac_ratio(self) -> float:
        return self.macs / self.peer_macs

    @property
    def throughput(self) -> float:
        return self.batch / (self.median_ms / 1e3)

    @property
    def memory_ratio(self) -> float | None:
        if not self.peak_bytes or not self.peer_peak_bytes:
            return None
        return self.peak_bytes / self.peer_peak_bytes


# ----------------------------------------------------------------------------- memory
@contextlib.contextmanager
def _peak_memory(device: torch.device):
    """Yields a one-element list that receives the peak bytes of tensor memory the block
    allocated on top of what was live before it.

    CUDA: ``max_memory_allocated`` minus the allocation at entry. CPU: the running sum of
    the profiler's allocation and free events (``profile_memory=True``), which counts
    tensors exactly; the process's resident set size cannot be attributed to one step,
    since the C allocator keeps freed pages and reuses them.
    """
    out: list[int | None] = [None]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out[0] = torch.cuda.max_memory_allocated(device) - base
        return
    import gc

    from torch.profiler import ProfilerActivity, profile

    # A collection inside the block would free tensors allocated before it, whose frees would
    # then be netted against the block's own allocations.
    gc.collect()
    with _quiet_native_stderr(not torch.cuda.is_available()), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    try:
        # Every allocation and free, in order (the per-op summaries net them out).
        changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    except AttributeError:  # a torch without the raw event list: report n/a rather than guess
        return
    live = peak = 0
    for _start, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    out[0] = peak


@contextlib.contextmanager
def _inductor_freezing():
    """Inductor's freezing while the graphs compile (CPU inference): parameters become constants,
    so BatchNorm folds and oneDNN weights are pre-packed once."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        yield


@contextlib.contextmanager
def _quiet_native_stderr(enabled: bool = True):
    """Silence C++-level stderr (file descriptor 2) inside the block.

    On machines without a GPU the profiler's Kineto backend prints ``profiler_start`` /
    ``profiler_stop`` lines and ``gpuGetDeviceCount failed with code 35`` there; they are not
    errors. Python-level output is untouched (only the descriptor is redirected)."""
    import os
    import sys

    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


# ----------------------------------------------------------------------------- steps
def _adaptive_head(model: nn.Module) -> nn.Module:
    """pytorchvideo heads pool with a fixed kernel sized for 8x224x224; make them adaptive so
    the peer accepts the same clip sizes as the octave model (same result at the default)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.AvgPool3d) and name.endswith("pool") and "blocks" in name:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], nn.AdaptiveAvgPool3d(1))
    return model


def route_conv3d_like_octave(model: nn.Module) -> int:
    """Give every ``nn.Conv3d`` of ``model`` the octave paths' CPU kernel choices; returns how many.

    Octave paths call oneDNN directly where PyTorch's dispatch rule would take its im2col
    kernel, and under autograd run ``1 x k x k`` kernels as 2D convolutions over the frames
    (``oct3d.nn.kernels``). Applied to a vanilla peer, this shows how much of a measured
    speed-up comes from those choices rather than from the octave saving.
    """
    return route_convs_like_octave(model, (nn.Conv3d,))


def route_convs_like_octave(model: nn.Module, types: tuple[type, ...] = (nn.Conv2d, nn.Conv3d)) -> int:
    """Send every convolution of ``types`` in ``model`` through ``oct3d.nn.kernels.conv_nd``, as
    octave paths are: autotuned kernels, and packed weights in eval mode without autograd.
    Returns how many. The ``--peer-routed`` control of the benchmark: octave against a vanilla
    network with the same kernel choices."""
    from oct3d.nn.kernels import conv_nd

    def forward(conv: nn.Module, x: Tensor) -> Tensor:
        return conv_nd(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                       not conv.training)

    routed = 0
    for module in model.modules():
        if type(module) in types and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            module.forward = functools.partial(forward, module)
            routed += 1
    return routed


def _prepare(model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool, dims: int) -> nn.Module:
    model = model.to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    return model


def _make_step(model: nn.Module, mode: str, x: Tensor, num_classes: int, dense: bool = False) -> Callable[[], None]:
    """One inference call or one training step (forward, cross-entropy, backward, SGD).

    ``dense``: a segmentation model, whose logits ``(N, classes, *spatial)`` get a per-voxel
    class target instead of one class per sample."""
    if mode == "inference":
        model.eval()

        def infer() -> None:
            with torch.inference_mode():
                model(x)

        return infer
    model.train()
    params = list(model.parameters())
    # As oct3d's trainer steps on CPU: the multi-tensor SGD (foreach_kwargs), for both models alike.
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, **foreach_kwargs(params))
    target_shape = (x.shape[0], *x.shape[2:]) if dense else (x.shape[0],)
    target = torch.randint(0, num_classes, target_shape, device=x.device)
    loss_fn = nn.CrossEntropyLoss()

    def train() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x).float(), target)
        loss.backward()
        optimizer.step()

    return train


def _timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _macs(build: Callable[[], nn.Module], shape: Sequence[int]) -> int:
    with torch.device("meta"):
        model = build()
    return count_macs(_adaptive_head(model), (1, *shape[1:]))


def benchmark_models(
    name: str,
    alphas: Sequence[float],
    octaves: Sequence[str | None] = (None,),
    modes: Sequence[str] = MODES,
    batch_size: int = 4,
    frames: int | None = None,
    size: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    channels_last: bool = False,
    compile: bool = False,
    fuse: bool = False,
    warmup: int = 3,
    iters: int = 10,
    model_kwargs: dict | None = None,
    peer_onednn: bool = False,
    spatial: Sequence[int] | None = None,
    peer_routed: bool = False,
) -> list[BenchResult]:
    """Time ``name`` at each alpha (and octave mode) against its vanilla peer, interleaved.

    Returns one :class:`BenchResult` per (alpha, octave mode, mode). ``fuse`` folds BatchNorm
    into the convolutions of every model (octave and peer alike) for inference.
    ``peer_onednn`` gives the peer's 3D convolutions the CPU kernel choices of the octave
    paths (see :func:`route_conv3d_like_octave`), a control that separates those choices from
    the octave saving; ``peer_routed`` does the same for every 2D and 3D convolution, packed
    weights included (see :func:`route_convs_like_octave`). ``spatial`` overrides the input's
    spatial size (``(H, W)`` or ``(T, H, W)``, e.g. a non-cubic volume). With ``compile`` on CPU, inference graphs are
    compiled with inductor's freezing (weights folded into the graph as constants).
    """
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"modes must be among {MODES}, got {m!r}")
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    dev = torch.device(device)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    shape = input_size(name, batch_size, frames, size)
    if spatial is not None:
        if len(spatial) != len(shape) - 2 or any(int(n) < 1 for n in spatial):
            raise ValueError(f"spatial must be {len(shape) - 2} positive sizes for {name}, got {spatial!r}")
        shape = (*shape[:2], *(int(n) for n in spatial))
    dims = len(shape) - 2
    model_kwargs = dict(model_kwargs or {})
    task = model_task(name)
    default_classes = {"image": 1000, "video": 400}.get(task, 2)  # the U-Net builder's default: 2
    num_classes = model_kwargs.get("num_classes", default_classes)

    # Every contender: (label, alpha, octave, builder). The peer goes first.
    contenders: list[tuple[str, float | None, str | None, Callable[[], nn.Module]]] = []
    if model_kwargs:
        # Custom widths have no torchvision/pytorchvideo twin: the same builder at alpha 0 is the vanilla net.
        contenders.append(("peer", None, None, lambda: build_octave(name, 0.0, **model_kwargs)))
    else:
        contenders.append(("peer", None, None, lambda: _adaptive_head(vanilla_peer(name)[1])))
    if dims == 3 and None in octaves:
        # Name the builder's default octave mode in the rows, not "-".
        from oct3d.models import builder_arguments

        default = builder_arguments(name, model_kwargs).get("octave")
        octaves = [default if o is None else o for o in octaves]
    for octave in octaves:
        for alpha in alphas:
            contenders.append(
                (name, float(alpha), octave, lambda a=alpha, o=octave: build_octave(name, float(a), o, **model_kwargs))
            )

    x = torch.randn(shape, device=dev, dtype=torch_dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)

    # Multiply-adds depend on the architecture and input size only, not on the mode.
    macs = [_macs(build, shape) for *_, build in contenders]
    results: list[BenchResult] = []
    for mode in modes:
        steps, peaks = [], []
        for _label, _alpha, _octave, build in contenders:
            model = _prepare(build(), dev, torch_dtype, channels_last, dims)
            if fuse and mode == "inference":
                from oct3d.fuse import fuse as fuse_model

                model = fuse_model(model, tuple(shape), inplace=True)
            if peer_onednn and _label == "peer":
                route_conv3d_like_octave(model)
            if peer_routed and _label == "peer":
                route_convs_like_octave(model)
            if compile:
                model = torch.compile(model)
            step = _make_step(model, mode, x, num_classes, dense=task == "segmentation")
            freezing = compile and dev.type == "cpu" and mode == "inference"
            with _inductor_freezing() if freezing else contextlib.nullcontext():
                for _ in range(max(warmup, 1 if compile else 0)):
                    step()
            with _peak_memory(dev) as peak:
                step()
            steps.append(step)
            peaks.append(peak[0])
        times: list[list[float]] = [[] for _ in contenders]
        for round_index in range(iters):
            # Rotate the order each round so no contender always runs right after another.
            order = list(range(len(contenders)))
            order = order[round_index % len(order):] + order[:round_index % len(order)]
            for i in order:
                times[i].append(_timed(steps[i], dev))
        medians = [statistics.median(t) for t in times]
        for i, (label, alpha, octave, _build) in enumerate(contenders[1:], start=1):
            results.append(
                BenchResult(
                    model=label, alpha=alpha, octave=octave, mode=mode, batch=shape[0], shape=tuple(shape),
                    median_ms=medians[i], peer_median_ms=medians[0], macs=macs[i], peer_macs=macs[0],
                    peak_bytes=peaks[i], peer_peak_bytes=peaks[0],
                    round_ratio=statistics.median(t / p for t, p in zip(times[i], times[0])),
                )
            )
    return results


# ----------------------------------------------------------------------------- kernel choices
def _op_cases() -> list[tuple[str, str, Callable[[], object], Callable[[], object]]]:
    """(operation, shape, PyTorch default, oct3d's choice) at octave-branch shapes of
    Oct-ResNet-50 (batch 4) and Oct-I3D-R50 (batch 1, 8 frames) at alpha 0.5."""
    import torch.nn.functional as F

    from oct3d.nn.conv import _add_upsampled_, conv_nd
    from oct3d.nn.octave import avg_pool, upsample_to

    cases = []
    torch_pool = {4: F.avg_pool2d, 5: F.avg_pool3d}
    for shape, factors in (((4, 128, 56, 56), (2, 2)), ((4, 256, 28, 28), (2, 2)),
                           ((1, 32, 8, 56, 56), (2, 2, 2)), ((1, 32, 8, 56, 56), (1, 2, 2))):
        x = torch.randn(shape)
        pool = torch_pool[len(shape)]
        cases.append((f"avg pool {'x'.join(map(str, factors))}", str(shape),
                      lambda x=x, f=factors, pool=pool: pool(x, f, f), lambda x=x, f=factors: avg_pool(x, f)))
    for shape, factors in (((4, 128, 56, 56), (2, 2)), ((4, 256, 28, 28), (2, 2)), ((1, 32, 8, 56, 56), (2, 2, 2))):
        y = torch.randn(shape)
        small = torch.randn(*shape[:2], *(n // f for n, f in zip(shape[2:], factors)))
        cases.append(("L->H upsample + add", str(shape),
                      lambda y=y, s=small, f=factors: y.add_(upsample_to(s, f, y.shape[2:])),
                      lambda y=y, s=small, f=factors: _add_upsampled_(y, s, f)))
    for shape, kernel, out in (((1, 32, 8, 56, 56), (1, 3, 3), 32), ((1, 64, 4, 28, 28), (1, 3, 3), 64),
                               ((1, 128, 4, 28, 28), (3, 1, 1), 32), ((1, 128, 4, 14, 14), (1, 3, 3), 128),
                               ((1, 32, 8, 56, 56), (1, 1, 1), 128)):
        x = torch.randn(shape)
        w = torch.randn(out, shape[1], *kernel) * 0.05
        pad = tuple(k // 2 for k in kernel)
        cases.append((f"conv3d {'x'.join(map(str, kernel))} -> {out}", str(shape),
                      lambda x=x, w=w, pad=pad: F.conv3d(x, w, None, 1, pad),
                      lambda x=x, w=w, pad=pad: conv_nd(x, w, None, (1, 1, 1), pad, (1, 1, 1), 1)))
    return cases


def op_table(iters: int = 20) -> str:
    """Markdown table timing oct3d's CPU kernel choices against PyTorch's defaults, interleaved.

    Covers the three places where the octave fast path departs from the obvious PyTorch call:
    average pooling (pairwise sums), the L->H upsample-add, and batch-1 3D convolutions
    (oneDNN called directly). Inference mode, median of ``iters`` interleaved calls each.
    """
    rows = []
    with torch.inference_mode():
        for op, shape, default, ours in _op_cases():
            for fn in (default, ours):
                fn()
            times: list[list[float]] = [[], []]
            for i in range(iters):
                for j in ((0, 1) if i % 2 == 0 else (1, 0)):
                    times[j].append(_timed((default, ours)[j], torch.device("cpu")))
            d, o = statistics.median(times[0]), statistics.median(times[1])
            rows.append(f"| {op} | {shape} | {d:.3f} | {o:.3f} | **{d / o:.2f}x** |")
    header = [
        f"CPU kernel choices, float32, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"medians of {iters} interleaved calls.",
        "",
        "| operation | input shape | PyTorch default ms | oct3d ms | speed-up |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(header + rows)


# ----------------------------------------------------------------------------- reporting
def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def format_results(results: Sequence[BenchResult], peer_label: str, setting: str) -> str:
    """A markdown table of ``results``: medians, throughput, peak memory and the two ratios."""
    unit = "clips/s" if results and len(results[0].shape) == 5 else "img/s"
    lines = [
        f"Setting: {setting}. Peer: {peer_label}. Times are medians of interleaved rounds; the time ratio is "
        "the median of the per-round ratios.",
        "",
        f"| model | alpha | octave | mode | octave ms | vanilla ms | time ratio | MAC ratio | {unit} | "
        "peak MB (oct / van) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.alpha} | {r.octave or '-'} | {r.mode} | {r.median_ms:.1f} | {r.peer_median_ms:.1f} | "
            f"**{r.time_ratio:.2f}x** | {r.mac_ratio:.2f}x | {r.throughput:.2f} | "
            f"{_mb(r.peak_bytes)} / {_mb(r.peer_peak_bytes)} |"
        )
    return "\n".join(lines)


def plot_results(results: Sequence[BenchResult], path: str | Path, title: str) -> None:
    """Time ratio and multiply-add ratio against alpha, one line per mode and octave mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[tuple[str, str | None], list[BenchResult]] = {}
    for r in results:
        groups.setdefault((r.mode, r.octave), []).append(r)
    for (mode, octave), rows in groups.items():
        rows = sorted(rows, key=lambda r: r.alpha)
        label = mode + (f", {octave}" if octave else "")
        ax.plot([r.alpha for r in rows], [r.time_ratio for r in rows], marker="o", label=f"time: {label}")
    seen: set[str | None] = set()
    for (_mode, octave), rows in groups.items():
        if octave in seen:
            continue
        seen.add(octave)
        rows = sorted(rows, key=lambda r: r.alpha)
        ax.plot([r.alpha for r in rows], [r.mac_ratio for r in rows], linestyle="--", color="gray",
                label="multiply-adds" + (f", {octave}" if octave else ""))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("alpha")
    ax.set_ylabel("octave / vanilla")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI
def _parse_clip(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or parts[1] != parts[2]:
        raise argparse.ArgumentTypeError(f"--clip must look like 8x224x224 (square frames), got {text!r}")
    return int(parts[0]), int(parts[1])


def _parse_spatial(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--spatial must look like 96x96x64 or 224x224, got {text!r}")
    return tuple(int(p) for p in parts)


def cpu_name() -> str:
    """The CPU for tables: its model name (``/proc/cpuinfo``, else ``platform.processor()``), then,
    where ``/proc/cpuinfo`` says, family and model, and the widest vector instructions ATen uses
    (``torch.backends.cpu.get_cpu_capability()``) with AMX where present. A VM's model name is often
    generic ("AMD EPYC", "Intel(R) Xeon(R) Processor"), and oneDNN's speed follows the ISA."""
    import platform

    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    extra = []
    if "cpu family" in fields and "model" in fields:
        extra.append(f"family {fields['cpu family']} model {fields['model']}")
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        isa = ""
    isa = {"AVX512": "AVX-512", "AVX2": "AVX2", "DEFAULT": "no AVX2"}.get(isa, isa)
    if "amx_tile" in fields.get("flags", "").split():
        isa = f"{isa} + AMX" if isa else "AMX"
    if isa:
        extra.append(isa)
    return f"{name} ({', '.join(extra)})" if extra else name


def results_to_json(
    results: Sequence[BenchResult], setting: str, model_kwargs: dict | None = None,
) -> list[dict]:
    """``results`` as JSON-ready dicts: every field, the ratios, the setting, the machine, and the octave
    model's complete builder arguments (``model_kwargs`` over the builder's defaults, so a later change
    of a default cannot make two files with the same setting mean different networks)."""
    from dataclasses import asdict

    from oct3d.models import builder_arguments
    from oct3d.nn import kernels

    rows = []
    for r in results:
        row = asdict(r)
        given = {**(model_kwargs or {}), "alpha": r.alpha, **({"octave": r.octave} if r.octave else {})}
        row.update(time_ratio=r.time_ratio, mac_ratio=r.mac_ratio, memory_ratio=r.memory_ratio,
                   throughput=r.throughput, setting=setting, cpu=cpu_name(), torch=torch.__version__,
                   threads=torch.get_num_threads(), autotune=kernels.tuning_enabled(),
                   builder_arguments=builder_arguments(r.model, given))
        rows.append(row)
    return rows


def json_table(paths: Sequence[str | Path]) -> str:
    """A markdown table of benchmark runs saved with ``--json``: one row per result, each with its
    file and its setting line (CPU model, threads, malloc, builder kwargs). A folder stands for
    every ``*.json`` file in it, in name order, each shown by its name; a file is shown as given.

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without ``*.json`` files.
        ValueError: a file that cannot be read as a ``--json`` file of this tool.
    """
    import json

    files: list[tuple[str, Path]] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.glob("*.json") if p.is_file())
            if not found:
                raise FileNotFoundError(f"no *.json benchmark files in folder {path}")
            files.extend((p.name, p) for p in found)
        elif path.is_file():
            files.append((str(path), path))
        else:
            raise FileNotFoundError(f"no benchmark JSON file or folder at {path}")

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    lines = [
        "| file | model | mode | batch | input | octave ms | peer ms | time ratio | MAC ratio | setting |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, file in files:
        try:
            rows = json.loads(file.read_text())
            if isinstance(rows, dict):
                rows = [rows]
            for r in rows:
                model = " ".join(str(v) for v in (r["model"], r["alpha"], r.get("octave")) if v is not None)
                shape = "x".join(str(n) for n in r["shape"][2:])
                lines.append(
                    f"| {cell(label)} | {cell(model)} | {r['mode']} | {r['batch']} | {shape} | {r['median_ms']:.1f} | "
                    f"{r['peer_median_ms']:.1f} | **{r['time_ratio']:.2f}x** | {r['mac_ratio']:.2f} | "
                    f"{cell(r['setting'])} |"
                )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{file} is not a benchmark --json file: {exc!r}") from exc
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="oct3d bench", description="Time octave models against their vanilla peers, interleaved in one process."
    )
    parser.add_argument("--model", default="oct_resnet50", help="registered octave model (see oct3d table)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--octave", nargs="+", choices=["spatial", "spatiotemporal"], default=None,
                        help="octave modes of a 3D model (default: spatial)")
    parser.add_argument("--mode", nargs="+", choices=[*MODES, "both"], default=["both"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last / channels_last_3d input and weights for both models "
                        "(oct3d's models run channels_last on CPU anyway: this is the control that gives the peer "
                        "the same layout)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=None, help="image side (2D models)")
    parser.add_argument("--clip", type=_parse_clip, default=None, help="TxHxW of a clip, e.g. 8x224x224")
    parser.add_argument("--spatial", type=_parse_spatial, default=None,
                        help="any spatial size, e.g. 96x96x64 for a volume (D x H x W) or 160x128 for an image")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--fuse", action="store_true", help="fold BatchNorm into convolutions for inference")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--malloc", choices=["steady", "default"], default="steady",
                        help="steady (default): raise glibc's mmap/trim thresholds so no model page-faults its "
                             "activations in every step (see steady_malloc); default: leave malloc alone")
    parser.add_argument("--scaling", choices=["batch", "frames"], default=None,
                        help="time the first alpha over batch sizes 1,2,4,8 or clip lengths 8,16,32")
    parser.add_argument("--model-kwargs", default=None,
                        help="JSON kwargs for the octave builder (e.g. '{\"base_width\": 16}'); "
                             "the peer is then the same builder at alpha 0")
    parser.add_argument("--peer-onednn", action="store_true",
                        help="control: give the peer's 3D convolutions the octave paths' CPU kernel choices")
    parser.add_argument("--peer-routed", action="store_true",
                        help="control: send all the peer's 2D/3D convolutions through the octave paths' kernel "
                             "choices (autotuning, packed weights)")
    parser.add_argument("--ops", action="store_true",
                        help="instead of models, time oct3d's CPU kernel choices against PyTorch's defaults")
    parser.add_argument("--output", default=None, help="write the markdown table here")
    parser.add_argument("--json", default=None, help="write the results as JSON here (one object per row)")
    parser.add_argument("--plot", default=None, help="write a PNG of time and multiply-add ratios against alpha")
    parser.add_argument("--table", nargs="+", default=None, metavar="JSON",
                        help="time nothing: print the markdown table of earlier --json files (or folders of them)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    _check_run_arguments(parser, args)
    if args.table:
        # Rendering saved runs times nothing: a timing option beside it would be silently ignored.
        ignored = [
            action.option_strings[0] for action in parser._actions
            if action.dest not in ("help", "table", "output") and action.option_strings
            and getattr(args, action.dest) != action.default
        ]
        if ignored:
            parser.error(f"--table renders saved --json runs and times nothing; it takes only --output, "
                         f"not {', '.join(ignored)}")
    return args


def _check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any timing, what would otherwise fail as a traceback or be ignored after minutes of it."""
    import json

    from oct3d.inference import check_output_file
    from oct3d.models import list_models

    for option in ("output", "json", "plot"):
        if getattr(args, option):
            check_output_file(parser, f"--{option}", getattr(args, option))
    if args.table:
        return
    if args.model not in list_models():
        parser.error(f"--model {args.model!r} is not a registered model; `oct3d table` lists them")
    bad = [a for a in args.alphas if not 0.0 <= a < 1.0]
    if bad:
        parser.error(f"--alphas must lie in [0, 1), got {bad}")
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.model_kwargs is not None:
        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as error:
            parser.error(f"--model-kwargs must be a JSON object, e.g. '{{\"base_width\": 16}}': {error}")
        if not isinstance(kwargs, dict):
            parser.error(f"--model-kwargs must be a JSON object, got {args.model_kwargs}")
    if args.plot and args.scaling:
        parser.error("--plot draws ratios against alpha; it does not apply to --scaling")
    if args.ops and (args.json or args.plot):
        parser.error("--ops prints a table of kernels (--output writes it); it has no --json or --plot")
    if args.fuse and ("train" in args.mode or "both" in args.mode):
        parser.error("--fuse folds BatchNorm for inference only: use it with --mode inference")


def _setting(args: argparse.Namespace, dev: str) -> str:
    parts = [f"device {dev}", args.dtype]
    if args.scaling != "batch":
        parts.append(f"batch {args.batch_size}")
    if args.channels_last:
        parts.append("channels_last input and weights in both models")
    elif dev == "cpu":
        parts.append("channels-first input (oct3d's models convert it to channels_last inside on CPU)")
    if args.model_kwargs:
        parts.append(f"builder kwargs {args.model_kwargs}")
    if args.compile:
        parts.append("torch.compile")
    if args.fuse:
        parts.append("BN folded")
    if args.peer_onednn:
        parts.append("peer's 3D convs routed like the octave paths")
    if args.peer_routed:
        parts.append("peer's convs routed through oct3d's kernel choices")
    if dev == "cpu":
        from oct3d.nn import kernels

        parts.append(f"{torch.get_num_threads()} threads, {cpu_name()}")
        parts.append("kernel autotuning " + ("on" if kernels.tuning_enabled() else "off"))
        parts.append("steady malloc" if args.malloc == "steady" else "default malloc")
    elif torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(torch.device(dev)))
    parts.append(f"torch {torch.__version__}")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/benchmark.py`` and ``oct3d bench``; returns the exit status."""
    import json

    args = parse_args(argv)
    if args.table:
        try:
            text = json_table(args.table)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}")
            return 2
        print(text)
        if args.output:
            Path(args.output).write_text(text + "\n")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "steady" and not steady_malloc():
        args.malloc = "default"  # not glibc: nothing to change
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda asked for, but CUDA is not available")
        return 2
    if args.ops:
        text = op_table(iters=args.iters)
        print(text)
        if args.output:
            Path(args.output).write_text(text + "\n")
        return 0
    modes = list(MODES) if "both" in args.mode else args.mode
    octaves: list[str | None] = list(args.octave) if args.octave else [None]
    if model_task(args.model) == "image" and args.octave:
        print("error: --octave applies to 3D models only")
        return 2
    frames, side = (args.clip if args.clip else (None, args.input_size))
    model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
    peer = f"{args.model} alpha=0" if model_kwargs else peer_label(args.model)
    common = dict(
        device=args.device, dtype=args.dtype, channels_last=args.channels_last, compile=args.compile, fuse=args.fuse,
        warmup=args.warmup, iters=args.iters, model_kwargs=model_kwargs, peer_onednn=args.peer_onednn,
        peer_routed=args.peer_routed,
        spatial=args.spatial,
    )
    sections: list[str] = []
    results: list[BenchResult] = []
    if args.scaling:
        alpha = args.alphas[0]
        values = [1, 2, 4, 8] if args.scaling == "batch" else [8, 16, 32]
        for value in values:
            batch = value if args.scaling == "batch" else args.batch_size
            clip_frames = value if args.scaling == "frames" else frames
            rows = benchmark_models(args.model, [alpha], octaves, modes, batch, clip_frames, side, **common)
            results.extend(rows)
        lines = [
            f"Scaling over {args.scaling} at alpha {alpha}; {_setting(args, args.device)}. Peer: {peer}.",
            "",
            f"| {args.scaling} | octave | mode | octave ms | vanilla ms | time ratio | MAC ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results:
            value = r.batch if args.scaling == "batch" else r.shape[2]
            lines.append(
                f"| {value} | {r.octave or '-'} | {r.mode} | {r.median_ms:.1f} | {r.peer_median_ms:.1f} | "
                f"**{r.time_ratio:.2f}x** | {r.mac_ratio:.2f}x |"
            )
        sections.append("\n".join(lines))
    else:
        results = benchmark_models(
            args.model, args.alphas, octaves, modes, args.batch_size, frames, side, **common
        )
        sections.append(format_results(results, peer, _setting(args, args.device)))
    text = "\n\n".join(sections)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    if args.json:
        rows = results_to_json(results, _setting(args, args.device), model_kwargs)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.plot and not args.scaling:
        plot_results(results, args.plot, f"{args.model}: {_setting(args, args.device)}")
    bad = [r for r in results if not math.isfinite(r.time_ratio)]
    return 1 if bad else 0
