#!/usr/bin/env bash
# Rebuilds the shipped tiny models and the README's results table from nothing (CPU only).
# About 2 hours on a 2-core CPU; every step prints where its outputs are. Run from the repo root:
#   bash experiments/reproduce-tiny.sh            (outputs under runs/tiny, models under checkpoints/)
set -euo pipefail
OUT=runs/tiny
mkdir -p "$OUT"

# 1. SFT data: 4,000 teacher trajectories (adaptive mix simple/medium/complex = 0.3/0.4/0.3).
python -m avr.data build --n 4000 --seed 0 -o runs/sft-data

# 2. SFT, 3,200 steps (experiments/sft.yaml), then export the embedded default.
python -m avr.fit experiments/sft.yaml --trainer.default_root_dir "$OUT/sft"
python -m avr.export "$(ls -d "$OUT"/sft/logs/version_* | tail -1)/checkpoints/last.ckpt" \
  -o checkpoints/shapeworld-tiny-sft

# 3. RL from it (experiments/rl.yaml, 120 steps; per-step rewards in $OUT/rl/csv/version_0/metrics.csv).
python -m avr.fit experiments/rl.yaml --trainer.max_steps 120 --trainer.default_root_dir "$OUT/rl" \
  --trainer.logger "[{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: $OUT/rl, name: csv}}]"
python -m avr.export "$OUT/rl/csv/version_0/checkpoints/last.ckpt" -o checkpoints/shapeworld-tiny-rl

# 4. Evaluation on 600 prompts over every tag (seed 7; training used seed 0), 10 ODE steps per image.
python -m avr.world prompts --n 600 --seed 7 -o "$OUT/eval-prompts.jsonl"
python -m avr.evaluate --model checkpoints/shapeworld-tiny-sft --prompts "$OUT/eval-prompts.jsonl" \
  --modes direct,reflect,plan,adaptive --steps 10 --workers 2 -o "$OUT/eval-sft"
python -m avr.evaluate --model checkpoints/shapeworld-tiny-rl --prompts "$OUT/eval-prompts.jsonl" \
  --modes direct,adaptive --steps 10 --workers 2 -o "$OUT/eval-rl"
echo "reports: $OUT/eval-sft/report.md $OUT/eval-rl/report.md"
