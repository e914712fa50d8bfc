#!/usr/bin/env bash
# FID against the 1,797 real digits, in the digits classifier's features, 1,000 samples (seed 0) per row:
# the embedded teacher (DDIM, trailing spacing, as its pipeline is saved) at 1, 2, 4, 10 and 50 steps, then each
# NAME=PIPELINE_DIR given at 1, 2 and 4 steps (with its own scheduler, as plain diffusers samples it); then the
# FID-vs-steps plot of all of them.
#   benchmarks/fid_digits.sh [NAME=DIR ...]      e.g. cd=runs/quickstart/cd/student lcm=runs/quickstart/lcm/student
# (TEACHER=dir measures another teacher; generated samples' statistics are cached, so reruns are quick.)
set -euo pipefail
cd "$(dirname "$0")/.."
teacher=${TEACHER:-samples/digits-teacher}
out=benchmarks/results/digits
mkdir -p "$out"
rm -f benchmarks/fid_digits.md
fid() {  # fid PIPELINE LABEL STEPS
  nice -n 10 stepdistill fid "$1" digits --steps "$3" --num-samples 1000 --seed 0 --metrics fid,kid,prc \
    --label "$2" --json "$out/$2-$3step.json" --markdown benchmarks/fid_digits.md
}
for steps in 1 2 4 10 50; do fid "$teacher" teacher "$steps"; done
for arg in "$@"; do
  for steps in 1 2 4; do fid "${arg#*=}" "${arg%%=*}" "$steps"; done
done
nice -n 10 stepdistill fid --plot "$out"/*step.json --out benchmarks/fid_vs_steps_digits.png \
  --title "digits: FID against steps (1,000 samples vs 1,797 real)"
