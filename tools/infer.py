"""Classify videos with an oct3d checkpoint or exported model; see ``oct3d.inference`` (same as ``oct3d infer``).

    python tools/infer.py --checkpoint CKPT [--output OUT.jsonl] [--topk 5] [--views 1|30]
                          [--window SEC --hop SEC] [--device auto|cpu|cuda] [--batch-size N]
                          [--decoder pyav|decord] PATH...
"""

import sys

from oct3d.inference import main
from oct3d.system import run_tool

if __name__ == "__main__":
    sys.exit(run_tool(main))
