#!/usr/bin/env bash
# Side by side on the same CPU threads: a Llama of hidden 256 × 4 layers (4 heads, 2
# key/value heads, intermediate 688), blocks of 128 tokens, batch 8, AdamW, f32 — kiln
# (`kiln train data/configs/llama-corpus.toml` with those sizes) against torch eager
# (transformers' LlamaForCausalLM in a plain AdamW loop, benches/llama_compare.py); then
# greedy generation of NEW tokens from the weights kiln trained: `kiln predict` (KV
# cache; its time includes loading the folder) against transformers' `generate`.
# Usage: benches/llama_compare.sh [STEPS] [NEW]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
steps="${1:-20}"
new="${2:-100}"
py="${KILN_PYTHON:-$HOME/.cache/kiln/venv/bin/python}"
out="target/llama-compare/kiln"
rm -rf "$out"
cargo build --release -q -p kiln-cli
export RAYON_NUM_THREADS=2
sizes=(--hidden_size 256 --intermediate_size 688 --num_hidden_layers 4 --num_attention_heads 4
    --num_key_value_heads 2 --max_position_embeddings 256 --block_size 128
    --per_device_train_batch_size 8 --learning_rate 1e-3 --max_grad_norm 1.0)
echo "+ kiln train data/configs/llama-corpus.toml ${sizes[*]} --max_steps $steps" >&2
target/release/kiln train data/configs/llama-corpus.toml "${sizes[@]}" --output_dir "$out" \
    --max_steps "$steps" --eval_strategy no --save_strategy no --load_best_model_at_end false \
    --metric_for_best_model none --overwrite_output_dir true --disable_tqdm true >/dev/null 2>&1
kiln_sps=$("$py" -c 'import json,sys; h=json.load(open(sys.argv[1]))["log_history"]; print([e for e in h if "train_steps_per_second" in e][-1]["train_steps_per_second"])' "$out/trainer_state.json")
# No end-of-sequence stop, so both generate exactly $new tokens.
"$py" -c 'import json,sys; p=sys.argv[1]+"/generation_config.json"; g=json.load(open(p)); g["eos_token_id"]=None; json.dump(g,open(p,"w"))' "$out"
start=$(date +%s.%N)
kiln_gen=$(target/release/kiln predict --model "$out" --text "once upon a time" --max-new-tokens "$new" --json)
end=$(date +%s.%N)
echo "+ torch eager, same config, tokenizer, blocks and steps; transformers generate" >&2
torch=$("$py" benches/llama_compare.py "$out" "$steps" 128 8 "$new" 2>/dev/null | tail -n 1)
"$py" - "$kiln_sps" "$start" "$end" "$new" "$kiln_gen" "$torch" <<'PY'
import json, sys
k, start, end, new = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
kg, t = json.loads(sys.argv[5]), json.loads(sys.argv[6])
kiln_tps = new / (end - start)
print(f"Llama h256 x4, seq 128, batch 8, 2 threads: kiln {k:.3f} steps/s, torch eager {t['train_steps_per_second']:.3f} steps/s, kiln/torch = {k / t['train_steps_per_second']:.2f}x")
print(f"greedy generation of {new} tokens: kiln predict {kiln_tps:.1f} tokens/s (whole process), transformers generate {t['generate_tokens_per_second']:.1f} tokens/s, kiln/transformers = {kiln_tps / t['generate_tokens_per_second']:.2f}x")
print(f"torch {t['torch']}, threads {t['threads']}")
PY
