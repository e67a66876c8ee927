"""Console scripts: ``oct3d`` (tools + training) and ``lightning`` (training only).

``oct3d table|bench|infer|export|segment|bench-data ...`` run the corresponding tool; any other subcommand
(``fit``, ``validate``, ``test``, ``predict``, ``--help``...) goes to the Lightning CLI, exactly
as ``lightning fit -c configs/oct_i3d.yaml`` does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["main", "lightning_main", "TOOLS"]

#: ``oct3d`` subcommand -> "module:function" taking ``argv`` and returning an exit status.
TOOLS: dict[str, str] = {
    "table": "oct3d.model_table:main",
    "bench": "oct3d.benchmark:main",
    "infer": "oct3d.inference:main",
    "export": "oct3d.export:main",
    "segment": "oct3d.segment:main",
    "bench-data": "oct3d.benchmark_data:main",
}

_TRAINING_COMMANDS = ("fit", "validate", "test", "predict")

_USAGE = """usage: oct3d {fit,validate,test,predict} [LightningCLI options]        (training, see `oct3d fit --help`)
       oct3d {table,bench,infer,export,segment,bench-data} [options]   (tools, see `oct3d infer --help`)"""


def _load_tool(spec: str) -> Callable[[list[str] | None], int]:
    import importlib

    module_name, function_name = spec.split(":")
    # Tools are imported lazily: `oct3d infer` should not pay for jsonargparse, nor `oct3d fit` for onnx.
    return getattr(importlib.import_module(module_name), function_name)


def lightning_main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lightning`` script: the octave LightningCLI (``fit/validate/test/predict``)."""
    from oct3d.lightning.cli import run_cli

    # None lets LightningCLI read sys.argv itself (passing both makes it warn).
    return run_cli(None if argv is None else list(argv))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``oct3d`` script: dispatch tools by subcommand, everything else to the LightningCLI."""
    args = list(sys.argv[1:]) if argv is None else list(argv)
    if args and args[0] in TOOLS:
        try:
            tool = _load_tool(TOOLS[args[0]])
        except ModuleNotFoundError as error:
            if error.name != TOOLS[args[0]].split(":")[0]:
                raise
            print(f"error: `oct3d {args[0]}` is not available in this installation ({error})", file=sys.stderr)
            return 2
        from oct3d.system import run_tool

        return run_tool(lambda: tool(args[1:]))
    if args and not args[0].startswith("-") and args[0] not in _TRAINING_COMMANDS:
        print(_USAGE, file=sys.stderr)
        print(f"oct3d: error: unknown command {args[0]!r}; choose one of "
              f"{', '.join((*_TRAINING_COMMANDS, *TOOLS))}", file=sys.stderr)
        return 2
    if args and args[0] in ("-h", "--help") and len(args) == 1:
        print(_USAGE)
        print("training options:")
    return lightning_main(None if argv is None else args)


if __name__ == "__main__":
    sys.argv[0] = "oct3d"  # argparse names the program after argv[0], here the path of this file
    sys.exit(main())
