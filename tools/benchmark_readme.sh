#!/usr/bin/env bash
# Every CPU run behind the README's speed tables, one after another, as JSON files in one folder
# (default docs/benchmarks/cpu_channels_last). Run it on an otherwise idle machine; it takes about
# eight minutes on 2 cores. Usage: bash tools/benchmark_readme.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/benchmarks/cpu_channels_last}"
mkdir -p "$out"
# make's venv when there is one, else the python on PATH (PYTHON=/path/to/python overrides both)
if [[ -n "${PYTHON:-}" ]]; then python="$PYTHON"
elif [[ -x .venv/bin/python ]]; then python=.venv/bin/python
else python="$(command -v python3 || command -v python)"
fi
bench() { "$python" tools/benchmark.py --alphas 0.5 --threads 2 "$@" 2>&1 | tail -1; }
r50_b4=(--model oct_resnet50 --mode inference --batch-size 4 --iters 30 --warmup 5)
r50_b1=(--model oct_resnet50 --mode inference --batch-size 1 --iters 60 --warmup 10)
r50_train=(--model oct_resnet50 --mode train --batch-size 4 --iters 15 --warmup 3)
i3d=(--model oct_i3d_r50 --octave spatiotemporal --mode inference --batch-size 1 --iters 8 --warmup 2)
unet_train=(--model oct_unet3d --mode train --batch-size 2 --spatial 48x48x32 --iters 15 --warmup 3)
unet_inf=(--model oct_unet3d --mode inference --batch-size 1 --spatial 96x96x64 --iters 10 --warmup 3)
narrow=(--model-kwargs '{"base_width": 16}')  # the U-Net at half its default width
for malloc in steady default; do
  bench "${r50_b4[@]}" --malloc "$malloc" --json "$out/r50_b4_inf_$malloc.json"
  bench "${r50_b1[@]}" --malloc "$malloc" --json "$out/r50_b1_inf_$malloc.json"
  bench "${r50_train[@]}" --malloc "$malloc" --json "$out/r50_b4_train_$malloc.json"
  bench "${i3d[@]}" --malloc "$malloc" --json "$out/i3d_inf_$malloc.json"
  bench "${unet_train[@]}" --malloc "$malloc" --json "$out/unet_train_$malloc.json"
  bench "${unet_inf[@]}" --malloc "$malloc" --json "$out/unet_inf_$malloc.json"
  bench "${unet_train[@]}" "${narrow[@]}" --malloc "$malloc" --json "$out/unet16_train_$malloc.json"
  bench "${unet_inf[@]}" "${narrow[@]}" --malloc "$malloc" --json "$out/unet16_inf_$malloc.json"
done
# Controls (steady malloc): both models channels_last; the octave model kept channels-first.
bench "${r50_b4[@]}" --channels-last --json "$out/r50_b4_inf_cl.json"
bench "${r50_b1[@]}" --channels-last --json "$out/r50_b1_inf_cl.json"
bench "${r50_train[@]}" --channels-last --json "$out/r50_b4_train_cl.json"
bench "${i3d[@]}" --channels-last --json "$out/i3d_inf_cl.json"
bench "${r50_b4[@]}" --model-kwargs '{"channels_last": false}' --json "$out/r50_b4_inf_octcf.json"
bench "${r50_b1[@]}" --model-kwargs '{"channels_last": false}' --json "$out/r50_b1_inf_octcf.json"
bench "${i3d[@]}" --model-kwargs '{"channels_last": false}' --json "$out/i3d_inf_octcf.json"
# Other modes: compiled, autotuning off, vanilla through the same kernel choices and layout.
bench "${r50_b4[@]}" --compile --json "$out/r50_b4_inf_compile.json"
bench "${r50_b1[@]}" --compile --json "$out/r50_b1_inf_compile.json"
OCT3D_AUTOTUNE=0 bench "${r50_b4[@]}" --json "$out/r50_b4_inf_noat.json"
OCT3D_AUTOTUNE=0 bench "${r50_b1[@]}" --json "$out/r50_b1_inf_noat.json"
bench "${r50_b4[@]}" --peer-routed --channels-last --json "$out/r50_b4_inf_routed_cl.json"
bench "${r50_b1[@]}" --peer-routed --channels-last --json "$out/r50_b1_inf_routed_cl.json"
bench "${unet_inf[@]}" --fuse --json "$out/unet_inf_fuse.json"  # BatchNorm folded in both U-Nets
# BatchNorm folded into both ResNets' weights (oct3d.fuse); the octave one's run-time folding turned off.
bench "${r50_b1[@]}" --fuse --json "$out/r50_b1_inf_fuse.json"
OCT3D_FOLD=0 bench "${r50_b1[@]}" --json "$out/r50_b1_inf_nofold.json"
# The table of every run in the folder, with each run's setting line (CPU model, threads, malloc).
"$python" tools/benchmark.py --table "$out" --output "$out/runs.md" > /dev/null
echo "wrote $out/*.json and $out/runs.md"
