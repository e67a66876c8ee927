"""Segment NIfTI volumes with an oct3d segmentation checkpoint; see ``oct3d.segment`` (same as ``oct3d segment``).

    python tools/segment.py --checkpoint CKPT --output-dir DIR [--output OUT.jsonl] [--overlap 0.5]
                            [--device auto|cpu|cuda] PATH...
"""

import sys

from oct3d.segment import main
from oct3d.system import run_tool

if __name__ == "__main__":
    sys.exit(run_tool(main))
