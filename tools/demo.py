"""The demo behind `make demo`: synthetic Kinetics-format data -> `lightning fit` -> `tools/infer.py` on held-out clips.

    python tools/demo.py --data data/synthetic_kinetics [--config configs/oct_i3d_demo.yaml] [-- LIGHTNING ARGS]

1. creates the synthetic motion dataset at ``--data`` if it is not there
   (``datamodules.synthetic.make_synthetic_kinetics``);
2. trains through the same command a user would type:
   ``lightning fit -c configs/oct_i3d_demo.yaml --data.root DIR`` (extra arguments after ``--`` are passed on);
3. runs the inference tool (``oct3d.inference``, i.e. ``tools/infer.py``) with the best checkpoint on
   held-out test clips the model never saw, and prints predictions next to the truth.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "oct_i3d_demo.yaml"


def ensure_data(root: Path, **generator_kwargs) -> bool:
    """Create the synthetic dataset at ``root`` unless it has annotations already; returns True if it created it."""
    if (root / "annotations" / "train.csv").is_file():
        print(f"[demo] using the dataset at {root}")
        return False
    from datamodules.synthetic import make_synthetic_kinetics

    print(f"[demo] writing the synthetic motion dataset to {root} ...", flush=True)
    summary = make_synthetic_kinetics(root, **generator_kwargs)
    counts = ", ".join(f"{n} {split}" for split, n in summary.videos_per_split.items())
    print(f"[demo] {len(summary.class_names)} classes ({', '.join(summary.class_names)}), {counts} videos, "
          f"{summary.seconds:.1f} s")
    return True


def lightning_command() -> list[str]:
    """The `lightning` console script of this environment (falls back to running oct3d.cli directly)."""
    script = Path(sys.executable).parent / "lightning"
    if script.is_file():
        return [str(script)]
    found = shutil.which("lightning")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from oct3d.cli import lightning_main; sys.exit(lightning_main())"]


def train(config: Path, root: Path, out: Path, extra: list[str]) -> tuple[Path, float]:
    """Run ``lightning fit`` and return (best checkpoint, wall seconds)."""
    command = [*lightning_command(), "fit", "-c", str(config), "--data.root", str(root),
               "--trainer.default_root_dir", str(out), *extra]
    print("[demo] " + shlex.join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    best = sorted(out.rglob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    last = sorted(out.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not best and not last:
        raise RuntimeError(f"training finished but wrote no checkpoint under {out}")
    return (best or last)[-1], seconds


def held_out_clips(root: Path, count: int) -> list[tuple[Path, str]]:
    """Up to ``count`` test videos (or val, when there is no test split), spread over the classes, with labels."""
    from datamodules import KineticsDataModule

    data = KineticsDataModule(str(root), num_workers=0)
    split = "test" if data.has_split("test") else "val"
    samples = data.samples(split)
    names = data.class_names
    # Round-robin over classes so a few clips still show every class.
    by_class: dict[int, list] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    picked = []
    while len(picked) < min(count, len(samples)):
        for label in sorted(by_class):
            if by_class[label] and len(picked) < count:
                picked.append(by_class[label].pop(0))
    return [(Path(s.path), names[s.label]) for s in picked]


def show_predictions(checkpoint: Path, clips: list[tuple[Path, str]]) -> float:
    """Run the inference tool on ``clips`` and print prediction vs truth; returns the accuracy."""
    from rich.console import Console
    from rich.table import Table

    from oct3d.inference import main as infer_main

    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "predictions.jsonl"
        args = ["--checkpoint", str(checkpoint), "--output", str(output), "--topk", "2", *[str(p) for p, _ in clips]]
        print("[demo] python tools/infer.py " + shlex.join(args[:2] + args[4:]), flush=True)
        status = infer_main(args)
        results = [json.loads(line) for line in output.read_text().splitlines()]
    truth = {str(path): label for path, label in clips}
    table = Table(title=f"held-out clips ({checkpoint.name})")
    for column in ("clip", "truth", "prediction", "score", ""):
        table.add_column(column)
    correct = 0
    for result in results:
        expected = truth[result["path"]]
        if "error" in result:
            table.add_row(Path(result["path"]).name, expected, "[red]error[/red]", "", result["error"])
            continue
        best = result["topk"][0]
        ok = best["label"] == expected
        correct += ok
        table.add_row(Path(result["path"]).name, expected, best["label"], f"{best['score']:.3f}",
                      "[green]ok[/green]" if ok else "[red]wrong[/red]")
    Console(width=120).print(table)
    accuracy = correct / max(len(results), 1)
    print(f"[demo] {correct}/{len(results)} held-out clips correct; inference exit status {status}")
    return accuracy


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring); returns 0 when every step ran."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description="Train a small octave video network on synthetic motion data.")
    parser.add_argument("--data", default="data/synthetic_kinetics", help="dataset root (created if absent)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="LightningCLI config to train")
    parser.add_argument("--out", default="lightning_logs/demo", help="logs and checkpoints go here")
    parser.add_argument("--clips", type=int, default=8, help="held-out clips to predict")
    args = parser.parse_args(argv)
    if args.clips < 1:
        parser.error(f"--clips must be >= 1, got {args.clips}")
    root, out = Path(args.data), Path(args.out)
    ensure_data(root)
    checkpoint, seconds = train(Path(args.config), root, out, extra)
    print(f"[demo] training took {seconds:.1f} s; best checkpoint {checkpoint}")
    show_predictions(checkpoint, held_out_clips(root, args.clips))
    return 0


if __name__ == "__main__":
    sys.exit(main())
