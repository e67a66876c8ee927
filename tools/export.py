"""Export an oct3d checkpoint to ONNX, TorchScript or a torch.export program; see ``oct3d.export``.

    python tools/export.py --checkpoint CKPT --format onnx|torchscript|exported-program OUT
"""

import sys

from oct3d.export import main
from oct3d.system import run_tool

if __name__ == "__main__":
    sys.exit(run_tool(main))
