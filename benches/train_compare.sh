#!/usr/bin/env bash
# Side by side: steps per second of a bundled run in kiln and in transformers' Trainer on
# the same CPU cores, and their ratio: cli/bundled/bert-sentiment.toml (the default;
# batch 32, max_length 64) or data/configs/gpt2-corpus.toml (batch 16, blocks of 64).
# The Llama family at the sizes people train (hidden 256 x 4 layers, seq 128) is
# benches/llama_compare.sh, which CONFIG data/configs/llama-corpus.toml runs.
# Usage: benches/train_compare.sh [STEPS] [CONFIG]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
steps="${1:-60}"
config="${2:-cli/bundled/bert-sentiment.toml}"
if [[ "$config" == *llama* ]]; then
    exec benches/llama_compare.sh "$steps"
fi
py="${KILN_PYTHON:-$HOME/.cache/kiln/venv/bin/python}"
out="target/train-compare/kiln"
rm -rf "$out"
cargo build --release -q -p kiln-cli
echo "+ kiln train $config --max_steps $steps (no eval, no save)" >&2
target/release/kiln train "$config" --output_dir "$out" --max_steps "$steps" \
    --eval_strategy no --save_strategy no --load_best_model_at_end false --metric_for_best_model none --overwrite_output_dir true --disable_tqdm true >/dev/null 2>&1
kiln_sps=$("$py" -c 'import json,sys; h=json.load(open(sys.argv[1]))["log_history"]; print([e for e in h if "train_steps_per_second" in e][-1]["train_steps_per_second"])' "$out/trainer_state.json")
echo "+ transformers Trainer, same config, tokenizer and steps" >&2
hf=$("$py" benches/train_compare.py "$out" "$steps" 2>/dev/null | tail -n 1)
hf_sps=$(echo "$hf" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["train_steps_per_second"])')
"$py" - "$kiln_sps" "$hf_sps" "$steps" "$hf" "$config" <<'PY'
import sys
k, h, steps, hf, config = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
print(f"{config}, {steps} steps, 2 threads: kiln {k:.3f} steps/s, transformers {h:.3f} steps/s, kiln/transformers = {k/h:.2f}x")
print(f"transformers run: {hf}")
PY
