#!/usr/bin/env bash
# FID of the embedded digits teacher (DDIM, trailing spacing, as its pipeline is saved) at 1, 2, 4, 10 and 50
# steps against the 1,797 real digits, in the digits classifier's features; then the FID-vs-steps plot,
# with a quickstart results.json (the consistency student) when one is given.
#   benchmarks/fid_digits.sh [runs/quickstart/results.json]      (TEACHER=dir to measure another pipeline)
set -euo pipefail
cd "$(dirname "$0")/.."
teacher=${TEACHER:-samples/digits-teacher}
out=benchmarks/runs/digits
mkdir -p "$out"
rm -f benchmarks/fid_digits.md
for steps in 1 2 4 10 50; do
  nice -n 10 stepdistill fid "$teacher" digits --steps "$steps" --num-samples 1000 --seed 0 \
    --metrics fid,kid,prc --label teacher --json "$out/teacher-${steps}step.json" --markdown benchmarks/fid_digits.md
done
nice -n 10 stepdistill fid --plot "$out"/teacher-*step.json "$@" --out benchmarks/fid_vs_steps_digits.png \
  --title "digits: FID against steps (1,000 samples vs 1,797 real)"
