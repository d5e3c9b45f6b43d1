#!/usr/bin/env bash
# Data-parallel scaling on this machine: steps and samples per second of the bundled BERT
# sentiment run (no eval, no save) with 1 and 2 MPI processes, and the ratios.
#
#   benches/dist_scaling.sh [STEPS]        (needs OpenMPI: openmpi-bin libopenmpi-dev)
#
# Two comparisons, on the same cores:
# - weak scaling: 32 examples per process, so 2 processes train a global batch of 64;
#   the ratio is samples/s(2) / samples/s(1) (ideal: 2 on 2 free cores);
# - strong scaling: the same global batch of 32 (1 x 32 against 2 x 16); the ratio is
#   steps/s(2) / steps/s(1).
# Each process gets cores/processes compute threads (RAYON_NUM_THREADS), so the runs
# never ask for more threads than the machine has.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
steps="${1:-40}"
cores=$(nproc)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cargo build --release -q -p kiln-cli --features mpi
bin=target/release/kiln
run() { # NP BATCH -> "steps_per_second samples_per_second"
    local np=$1 batch=$2 out="target/dist-scaling/np$1-b$2"
    rm -rf "$out"
    RAYON_NUM_THREADS=$((cores / np > 0 ? cores / np : 1)) \
        mpirun --oversubscribe --bind-to none -x RAYON_NUM_THREADS -np "$np" "$bin" train \
        cli/bundled/bert-sentiment.toml --output_dir "$out" --max_steps "$steps" \
        --per_device_train_batch_size "$batch" --eval_strategy no --save_strategy no \
        --load_best_model_at_end false --metric_for_best_model none --disable_tqdm true \
        >/dev/null 2>&1
    python3 -c 'import json,sys; e=[e for e in json.load(open(sys.argv[1]))["log_history"] if "train_steps_per_second" in e][-1]; print(e["train_steps_per_second"], e["train_samples_per_second"])' "$out/trainer_state.json"
}
read -r s1 x1 < <(run 1 32)
read -r s2 x2 < <(run 2 32)
read -r s3 x3 < <(run 2 16)
python3 - "$steps" "$cores" "$s1" "$x1" "$s2" "$x2" "$s3" "$x3" <<'PY'
import sys
steps, cores = sys.argv[1], sys.argv[2]
s1, x1, s2, x2, s3, x3 = map(float, sys.argv[3:])
print(f"BERT sentiment, {steps} steps, {cores} cores")
print(f"1 process  x batch 32: {s1:.3f} steps/s, {x1:.1f} samples/s")
print(f"2 processes x batch 32: {s2:.3f} steps/s, {x2:.1f} samples/s  weak scaling (samples/s) {x2/x1:.2f}x")
print(f"2 processes x batch 16: {s3:.3f} steps/s, {x3:.1f} samples/s  strong scaling (steps/s, same global batch) {s3/s1:.2f}x")
PY
