#!/usr/bin/env bash
# The recipe's spread over training seeds: train the tiny model once per seed, then print each model's
# acceptance checks (benchmarks/tiny_acceptance.py, with the extra unseen captions of unseen_extra.txt),
# template probe (benchmarks/template_probe.py) and procedural check.
#
#     bash benchmarks/recipe_seeds.sh OUT DEVICE "TRAIN-TINY OPTIONS" SEED...
#     bash benchmarks/recipe_seeds.sh /tmp/seeds cuda "" 0 1 2 3
#
# On a GPU the trainings run at once, sharing the device (on one H200, five shared it at about 9.5
# steps/s each); on the CPU one after another (~30 min each on 2 cores). N_SEEDS sets the sampling seeds
# of the checks (default 16, 8 for the procedural one).
set -uo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 OUT DEVICE \"TRAIN-TINY OPTIONS\" SEED...  (pass \"\" for no options)" >&2
  exit 2
fi
out=$1 device=$2 opts=$3
shift 3
mkdir -p "$out"
train() {
  # shellcheck disable=SC2086
  python3 -m dori.cli zoo train-tiny --out "$out/seed$1" --seed "$1" --device "$device" $opts \
    >"$out/train$1.log" 2>&1 || echo "seed $1: training failed (see $out/train$1.log)" >&2
}
for s in "$@"; do
  if [[ $device == cpu ]]; then train "$s"; else train "$s" & fi
done
wait
check() {
  echo "=== seed $1 ($opts): $(grep -o '"train_seconds": [0-9.]*' "$out/seed$1/dori_recipe.json") \
$(grep -o '"final_loss_ema": [0-9.]*' "$out/seed$1/dori_recipe.json")"
  python3 benchmarks/tiny_acceptance.py --model "$out/seed$1" --device "$device" --n-seeds "${N_SEEDS:-16}" \
    --unseen benchmarks/unseen_extra.txt
  python3 benchmarks/template_probe.py --model "$out/seed$1" --device "$device"
  python3 benchmarks/procedural_conditioning.py --model "$out/seed$1" --device "$device" \
    --n-seeds "${N_SEEDS:-8}" | tail -7
}
for s in "$@"; do
  if [[ -f $out/seed$s/dori_recipe.json ]]; then check "$s" >"$out/eval$s.log" 2>"$out/eval$s.err" & fi
done
wait
for s in "$@"; do
  cat "$out/eval$s.log" 2>/dev/null || echo "=== seed $s: no model (training failed)"
done
