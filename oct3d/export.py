"""Export a trained octave classifier for deployment: ONNX, TorchScript or a ``torch.export`` program.

``python tools/export.py --checkpoint CKPT --format onnx|torchscript|exported-program OUT``
(also ``oct3d export``) writes ``OUT`` and a sidecar ``OUT.json`` holding the class names and the
preprocessing (clip length, sampling rate, crop, normalisation), so ``tools/infer.py --checkpoint OUT``
classifies videos with the exported model exactly as with the checkpoint. The batch axis is dynamic.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oct3d.inference import CheckpointError, ModelMetadata, check_output_file, load_predictor

__all__ = ["FORMATS", "export_model", "export_checkpoint", "main"]

FORMATS = ("onnx", "torchscript", "exported-program")
#: Conventional file suffix per format (a warning is printed for other suffixes, nothing is renamed).
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}


class _Logits(nn.Module):
    """Wraps a backbone so the exported graph has one plain tensor output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _onnx_max_error(model: nn.Module, example: torch.Tensor, path: Path) -> float | None:
    """Largest |onnxruntime - eager| on ``example``, relative to the largest |eager| output where that
    exceeds 1 (float32 rounding grows with the logits' scale); None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    with torch.no_grad():
        expected = model(example).numpy()
    return float(abs(got - expected).max()) / max(1.0, float(abs(expected).max()))


def _without_in_place_ops(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the reference octave path and with out-of-place activations.

    The TorchScript-based ONNX exporter mis-translates in-place updates of views (the octave fast
    path adds the L->H map into a broadcast view of the H->H output; ``ReLU(inplace=True)`` after
    an octave BatchNorm): Oct-ResNet-50 came out wrong by ~2 at torch 2.14. The reference path
    computes the same function without them.
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "fast_path"):
            module.fast_path = False
        if hasattr(module, "inplace") and isinstance(module.inplace, bool):
            module.inplace = False
    return model


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Send what native code writes to file descriptor 1 to /dev/null for the duration."""
    if sys.stdout is not None:
        sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        if sys.stdout is not None:
            sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _channels_first(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s oct3d modules in the default memory format for the duration.

    ONNX has no memory format: the TorchScript-based exporter cannot express the channels_last
    conversion oct3d's models make on CPU (nor a channels_last weight's: the builders store their
    convolution weights so), and the runtime picks its own layout anyway.
    """
    changed = [m for m in model.modules() if getattr(m, "channels_last", False) is not False]
    saved = [m.channels_last for m in changed]
    weights = [(p, p.data) for p in model.parameters() if p.dim() in (4, 5) and not p.is_contiguous()]
    try:
        for m in changed:
            m.channels_last = False
        for p, data in weights:
            p.data = data.contiguous()
        yield
    finally:
        for m, value in zip(changed, saved):
            m.channels_last = value
        for p, data in weights:
            p.data = data


def _onnx_opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)


def _export_onnx(model: nn.Module, example: torch.Tensor, out: Path, opset: int, batch: Any,
                 tolerance: float = 1e-4) -> None:
    names = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript-based exporter is several times faster than the dynamo one (3 s vs 24 s for a
            # small Oct-I3D) but deprecated; every export is checked against eager and redone with dynamo
            # if it differs.
            with _native_stdout_silenced(), _channels_first(model):  # (a failed attempt dumps its graph from C++)
                torch.onnx.export(_without_in_place_ops(model), (example,), str(out), dynamo=False,
                                  dynamic_axes={"input": {0: "batch"}}, **names)
            error = _onnx_max_error(model, example, out)
            if error is not None and error <= tolerance:
                return
        except Exception:
            pass
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes={"x": {0: batch}},
                                    external_data=False, verbose=False, **names)
        program.save(str(out), external_data=False)
    error = _onnx_max_error(model, example, out)
    if error is not None and error > tolerance:
        out.unlink(missing_ok=True)
        raise ExportError(f"the ONNX export differs from the eager model by {error:.3g} (relative to its largest "
                          f"output; more than {tolerance}), so {out} was not kept")
    written = _onnx_opset(out)
    if written != opset:
        out.unlink(missing_ok=True)
        raise ExportError(f"--opset {opset}: torch's TorchScript-based exporter could not write this model at opset "
                          f"{opset}, and its dynamo exporter wrote opset {written}; ask for a newer opset (the "
                          f"TorchScript-based exporter writes oct3d's models from opset 9, the dynamo one from "
                          f"{written})")


class ExportError(ValueError):
    """A model that cannot be exported as asked (e.g. an ONNX opset the exporter cannot write)."""


def export_model(model: nn.Module, metadata: ModelMetadata, fmt: str, out: str | os.PathLike,
                 opset: int = 18) -> Path:
    """Export ``model`` (eval mode, CPU) to ``out`` in format ``fmt`` and write the ``out.json`` sidecar.

    Args:
        model: a classifier returning logits.
        metadata: task, class names and preprocessing of the model (defines the example input shape).
        fmt: ``"onnx"``, ``"torchscript"`` or ``"exported-program"``.
        out: output file.
        opset: ONNX opset version.

    Returns:
        the path of the exported model.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _Logits(model).eval().cpu()
    # Batch 2 so the traced graph does not specialise the batch axis to 1.
    example = torch.randn(metadata.input_shape(batch_size=2))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        if fmt == "onnx":
            _export_onnx(wrapped, example, out, opset, batch)
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer notes on constant sizes; jit.trace's deprecation notice
                traced = torch.jit.trace(wrapped, (example,), check_trace=False)
            torch.jit.save(traced, str(out))
        else:
            program = torch.export.export(wrapped, (example,), dynamic_shapes={"x": {0: batch}})
            torch.export.save(program, str(out))
    sidecar = {
        "format": fmt,
        "input_shape": ["batch", *metadata.input_shape()[1:]],
        "input_name": "input",
        "output_name": "logits",
        "oct3d": metadata.to_dict(),
    }
    with open(out.with_name(out.name + ".json"), "w") as handle:
        json.dump(sidecar, handle, indent=2)
    return out


def export_checkpoint(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike,
                      trust_checkpoint: bool = False, opset: int = 18) -> Path:
    """Load a ``lightning fit`` checkpoint and export its model (see :func:`export_model`)."""
    predictor = load_predictor(checkpoint, device="cpu", trust_checkpoint=trust_checkpoint, amp=False)
    if predictor.source != "checkpoint":
        raise CheckpointError(f"{checkpoint} is already an exported model ({predictor.source}); export a .ckpt")
    model: Any = predictor._run
    return export_model(model, predictor.metadata, fmt, out, opset)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``tools/export.py`` / ``oct3d export``."""
    parser = argparse.ArgumentParser(prog="oct3d export", description="Export an oct3d checkpoint for deployment.")
    parser.add_argument("out", metavar="OUT", help="output file (.onnx, .pt or .pt2); OUT.json gets the metadata")
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt written by `lightning fit`")
    parser.add_argument("--format", required=True, choices=FORMATS, help="export format")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow full unpickling of a checkpoint that weights_only loading refuses")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 on success, 2 when the checkpoint cannot be exported."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format == "onnx":
        missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
        if missing:
            print(f"error: --format onnx needs {' and '.join(missing)}: pip install 'oct3d[onnx]'", file=sys.stderr)
            return 2
    if args.format == "onnx":
        from torch.onnx import _constants as onnx_constants

        low, high = onnx_constants.ONNX_MIN_OPSET, onnx_constants.ONNX_MAX_OPSET
        if not low <= args.opset <= high:
            parser.error(f"--opset must be an ONNX opset from {low} to {high} (this torch's exporters), got "
                         f"{args.opset}; 18 is the default")
    check_output_file(parser, "OUT", args.out, [args.checkpoint])
    check_output_file(parser, "OUT's sidecar", args.out + ".json", [args.checkpoint])
    if Path(args.out).suffix != SUFFIXES[args.format]:
        print(f"note: {args.format} files usually end in {SUFFIXES[args.format]}", file=sys.stderr)
    try:
        out = export_checkpoint(args.checkpoint, args.format, args.out, args.trust_checkpoint, args.opset)
    except (CheckpointError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {out.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
