#!/usr/bin/env bash
# The recipe's spread over training seeds: train the tiny model once per seed, all at once, then print
# each model's acceptance checks (benchmarks/tiny_acceptance.py) and procedural check.
#
#     bash benchmarks/recipe_seeds.sh OUT DEVICE "TRAIN-TINY OPTIONS" SEED...
#     bash benchmarks/recipe_seeds.sh /tmp/seeds cuda "" 0 1 2 3
#
# N_SEEDS sets the sampling seeds of the checks (default 16, 8 for the procedural one).
# Meant for a GPU, where several tiny trainings share one device; on 2 CPU cores each takes ~30 min.
set -uo pipefail
out=$1 device=$2 opts=$3
shift 3
mkdir -p "$out"
for s in "$@"; do
  # shellcheck disable=SC2086
  python3 -m dori.cli zoo train-tiny --out "$out/seed$s" --seed "$s" --device "$device" $opts \
    >"$out/train$s.log" 2>&1 &
done
wait
for s in "$@"; do
  {
    echo "=== seed $s ($opts): $(grep -o '"train_seconds": [0-9.]*' "$out/seed$s/dori_recipe.json" 2>/dev/null) \
$(grep -o '"final_loss_ema": [0-9.]*' "$out/seed$s/dori_recipe.json" 2>/dev/null)"
    tail -c 300 "$out/train$s.log" | tr '\r' '\n' | tail -2
    python3 benchmarks/tiny_acceptance.py --model "$out/seed$s" --device "$device" --n-seeds "${N_SEEDS:-16}" 2>/dev/null
    python3 benchmarks/procedural_conditioning.py --model "$out/seed$s" --device "$device" --n-seeds "${N_SEEDS:-8}" \
      2>/dev/null | tail -3
  } >"$out/eval$s.log" 2>&1 &
done
wait
cat "$out"/eval*.log
