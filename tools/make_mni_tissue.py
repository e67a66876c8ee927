"""Write a small Decathlon-layout gray/white-matter dataset cut from nilearn's MNI152 template.

    pip install 'oct3d[mri-demo]'          # nilearn, which ships the template
    python tools/make_mni_tissue.py data/mni_tissue [--train 24] [--test 6] [--crop 64 64 64] [--seed 0]

See ``datamodules.mni_tissue`` for what the cases are.
"""

from __future__ import annotations

import argparse
import sys

from datamodules.mni_tissue import make_mni_tissue


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 on success, 2 when the template cannot be found."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="dataset root to write")
    parser.add_argument("--train", type=int, default=24, help="training pseudo-subjects (default 24)")
    parser.add_argument("--test", type=int, default=6, help="test pseudo-subjects (default 6)")
    parser.add_argument("--crop", type=int, nargs=3, default=[64, 64, 64], metavar=("X", "Y", "Z"),
                        help="voxels per case at 1 mm (default 64 64 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of crops and augmentation")
    parser.add_argument("--template-dir", help="folder with the three template files (default: nilearn's)")
    args = parser.parse_args(argv)
    if min(args.crop) < 4:
        parser.error(f"--crop must be 3 sizes >= 4, got {' '.join(map(str, args.crop))}")
    if args.train < 1:
        parser.error(f"--train must be >= 1, got {args.train}")
    if args.test < 0:
        parser.error(f"--test must be >= 0, got {args.test}")
    try:
        summary = make_mni_tissue(args.out, args.train, args.test, tuple(args.crop), seed=args.seed,
                                  template_dir=args.template_dir)
    except (FileNotFoundError, ValueError) as error:
        message = str(error)
        print(f"error: {'--crop' + message[len('crop_size'):] if message.startswith('crop_size') else message}",
              file=sys.stderr)
        return 2
    fractions = ", ".join(f"{f:.1%}" for f in summary.label_fractions)
    print(f"wrote {summary.train_cases} training and {summary.test_cases} test cases of {summary.crop_size} to "
          f"{summary.root} (training Y voxels {summary.train_y}, test {summary.test_y}; "
          f"background/gray/white {fractions})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
