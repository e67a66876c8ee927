"""Distributed training: `lightning fit` with strategy=ddp, 2 CPU processes (gloo), through the console script.

DDP re-launches the command for the second rank, so it runs in a subprocess (re-launching pytest would
not work); this also checks that the `lightning` console script runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_ddp_fit_two_cpu_processes(tiny_kinetics, tmp_path):
    command = [
        str(Path(sys.executable).parent / "lightning"), "fit", "-c", str(REPO / "configs" / "oct_i3d_demo.yaml"),
        "--data.root", str(tiny_kinetics), "--data.num_workers", "0", "--data.batch_size", "1",
        "--data.num_frames", "4", "--data.sampling_rate", "2", "--data.crop_size", "32",
        "--data.min_short_side", "32", "--data.max_short_side", "36",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]
    # One thread per rank: two ranks share the two cores of CI.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    (last,) = tmp_path.rglob("last.ckpt")
    state = torch.load(last, weights_only=True)
    # 6 training videos, batch 1 per rank, 2 ranks: 3 steps per epoch (DistributedSampler splits the data).
    assert (state["epoch"], state["global_step"]) == (0, 3)
    assert state["oct3d"]["num_classes"] == 3
    # The validation metric is reduced over both ranks (3 val videos: 2 + 1 padded to 2 + 2).
    assert "val/top1" in str(state["callbacks"])
