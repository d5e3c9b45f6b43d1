#!/usr/bin/env bash
# Activation checkpointing at the sizes people train: BERT h256 x 4 layers (intermediate
# 1024, 128 tokens a row, batch 16) and a Llama h256 x 4 layers (intermediate 688,
# blocks of 128 tokens, batch 8), AdamW, f32, 2 threads, each trained with and without
# --activation_checkpointing true. Prints the process's peak RSS (/usr/bin/time), the
# training stage's peak above its end (train_mem_cpu_peaked_delta, from
# --skip_memory_metrics false), steps/s, and whether the two runs' weights are the same
# bytes (they must be).
# Usage: benches/checkpointing_memory.sh [STEPS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
steps="${1:-6}"
root="target/checkpointing-memory"
rm -rf "$root"
mkdir -p "$root"
cargo build --release -q -p kiln-cli
export RAYON_NUM_THREADS=2
# Rows of 200 words of the bundled corpus (cut at 128 tokens).
python3 benches/long_rows.py "$root/long.jsonl" 256
common=(--do_train true --save_strategy no --disable_tqdm true --skip_memory_metrics false
    --max_steps "$steps" --logging_steps "$steps")
bert=(cli/bundled/bert-sentiment.toml --train_file "$root/long.jsonl" --hidden_size 256
    --num_hidden_layers 4 --num_attention_heads 4 --intermediate_size 1024 --max_length 128
    --max_position_embeddings 512 --vocab_size 4000 --per_device_train_batch_size 16
    --eval_strategy no --load_best_model_at_end false --metric_for_best_model none)
llama=(data/configs/llama-corpus.toml --hidden_size 256 --intermediate_size 688
    --num_hidden_layers 4 --num_attention_heads 4 --num_key_value_heads 2
    --max_position_embeddings 256 --block_size 128 --per_device_train_batch_size 8
    --eval_strategy no --load_best_model_at_end false --metric_for_best_model none)
run() { # name, args...
    local name=$1; shift
    echo "+ kiln train $* (${name})" >&2
    /usr/bin/time -f "%M" -o "$root/$name.rss" target/release/kiln train "$@" "${common[@]}" \
        --output_dir "$root/$name" >/dev/null 2>"$root/$name.err"
}
run bert "${bert[@]}"
run bert-ckpt "${bert[@]}" --activation_checkpointing true
run llama "${llama[@]}"
run llama-ckpt "${llama[@]}" --activation_checkpointing true
python3 - "$root" "$steps" <<'PY'
import json, sys
root, steps = sys.argv[1], sys.argv[2]
def stats(name):
    h = json.load(open(f"{root}/{name}/trainer_state.json"))["log_history"]
    s = [e for e in h if "train_steps_per_second" in e][-1]
    rss = int(open(f"{root}/{name}.rss").read().split()[-1]) / 1024
    return s["train_steps_per_second"], rss, s["train_mem_cpu_peaked_delta"] / 2**20, s["train_mem_cpu_alloc_delta"] / 2**20
print(f"{steps} steps, f32, 2 threads; MiB")
print("| model | checkpointing | peak RSS | train peaked delta | train alloc delta | steps/s |")
print("|---|---|---|---|---|---|")
for model, label in [("bert", "BERT h256x4, seq 128, batch 16"), ("llama", "Llama h256x4, seq 128, batch 8")]:
    rows = {}
    for name in (model, f"{model}-ckpt"):
        rows[name] = stats(name)
        sps, rss, peak, alloc = rows[name]
        on = "on" if name.endswith("ckpt") else "off"
        print(f"| {label} | {on} | {rss:.0f} | {peak:.0f} | {alloc:.0f} | {sps:.3f} |")
    same = open(f"{root}/{model}/model.safetensors", "rb").read() == open(f"{root}/{model}-ckpt/model.safetensors", "rb").read()
    (s0, r0, _, _), (s1, r1, _, _) = rows[model], rows[f"{model}-ckpt"]
    print(f"{label}: with checkpointing peak RSS {r1 / r0:.2f}x, speed {s1 / s0:.2f}x, weights identical: {same}")
PY
