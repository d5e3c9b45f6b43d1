#!/usr/bin/env bash
# Training speed at the sizes people train, kiln against torch eager on the same CPU
# threads (default 2): BERT h256 x 4 layers (4 heads, intermediate 1024, rows of 128
# tokens, batch 16), GPT-2 n_embd 256 x 4 layers (block 128, batch 8) and a Llama h256 x 4
# layers (4 heads, 2 key/value heads, intermediate 688, block 128, batch 8); AdamW, f32,
# dropout as the configs have it. Steady state: steps WARMUP..WARMUP+STEPS are timed on
# both sides (kiln from its logged train_runtime at those steps). Prints steps/s, the
# ratio, the achieved GFLOP/s, their share of torch's best sgemm rate on these cores
# (the practical peak), and both processes' peak RSS.
# Usage: benches/speed_compare.sh [STEPS] [WARMUP] [THREADS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
steps="${1:-20}"
warmup="${2:-5}"
threads="${3:-2}"
if (( steps % warmup != 0 )); then
    echo "STEPS must be a multiple of WARMUP (kiln logs every WARMUP steps)" >&2
    exit 2
fi
py="${KILN_PYTHON:-$HOME/.cache/kiln/venv/bin/python}"
root="target/speed-compare"
rm -rf "$root"
mkdir -p "$root"
cargo build --release -q -p kiln-cli
export RAYON_NUM_THREADS="$threads"
# Rows of 200 words of the bundled corpus (cut at 128 tokens).
python3 benches/long_rows.py "$root/long.jsonl" 512
total=$((warmup + steps))
common=(--do_train true --save_strategy no --disable_tqdm true --max_steps "$total"
    --logging_steps "$warmup" --include_num_input_tokens_seen true --learning_rate 1e-3
    --max_grad_norm 1.0 --eval_strategy no --load_best_model_at_end false --metric_for_best_model none)
declare -A args
args[bert]="cli/bundled/bert-sentiment.toml --train_file $root/long.jsonl --hidden_size 256 --num_hidden_layers 4 --num_attention_heads 4 --intermediate_size 1024 --max_length 128 --max_position_embeddings 512 --vocab_size 8000 --per_device_train_batch_size 16"
args[gpt2]="data/configs/gpt2-corpus.toml --n_embd 256 --n_layer 4 --n_head 4 --n_positions 256 --block_size 128 --per_device_train_batch_size 8"
args[llama]="data/configs/llama-corpus.toml --hidden_size 256 --intermediate_size 688 --num_hidden_layers 4 --num_attention_heads 4 --num_key_value_heads 2 --max_position_embeddings 256 --block_size 128 --per_device_train_batch_size 8"
declare -A batch=([bert]=16 [gpt2]=8 [llama]=8)
for name in bert gpt2 llama; do
    echo "+ kiln train ${args[$name]} (${name})" >&2
    # shellcheck disable=SC2086
    /usr/bin/time -f "%M" -o "$root/$name.rss" target/release/kiln train ${args[$name]} "${common[@]}" \
        --output_dir "$root/$name" >/dev/null 2>"$root/$name.err"
    kind=causal
    [[ "$name" == bert ]] && kind=bert
    printf '[{"name": "%s", "dir": "%s", "kind": "%s", "batch": %d, "seq": 128, "warmup": %d, "steps": %d}]' \
        "$name" "$root/$name" "$kind" "${batch[$name]}" "$warmup" "$steps" >"$root/$name.job.json"
    echo "+ torch eager, the same model and shapes ($name)" >&2
    "$py" benches/speed_compare.py "$root/$name.job.json" "$threads" 2>/dev/null | tail -n 1 >"$root/$name.torch.json"
done
echo '[]' >"$root/peak.json"
"$py" benches/speed_compare.py "$root/peak.json" "$threads" 2>/dev/null | tail -n 1 >"$root/peak.torch.json"
"$py" - "$root" "$warmup" "$steps" "$threads" <<'PY'
import json, sys
root, warmup, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
peak = json.load(open(f"{root}/peak.torch.json"))
print(f"{steps} steps after {warmup} of warm-up, {threads} threads, f32; torch {peak['torch']}, "
      f"best sgemm 2048^2: {peak['sgemm_gflops']:.1f} GFLOP/s")
print("| model | kiln steps/s | torch steps/s | kiln/torch | kiln GFLOP/s (% of sgemm) | torch GFLOP/s (% of sgemm) | kiln / torch peak RSS MiB |")
print("|---|---|---|---|---|---|---|")
for name, label in [("bert", "BERT h256x4, seq 128, batch 16"), ("gpt2", "GPT-2 h256x4, seq 128, batch 8"),
                    ("llama", "Llama h256x4, seq 128, batch 8")]:
    h = json.load(open(f"{root}/{name}/trainer_state.json"))["log_history"]
    runtime = {e["step"]: e["train_runtime"] for e in h if "train_runtime" in e and "loss" in e}
    kiln = steps / (runtime[warmup + steps] - runtime[warmup])
    t = json.load(open(f"{root}/{name}.torch.json"))["result"]
    flop = t["gflop_per_step"]
    rss = int(open(f"{root}/{name}.rss").read().split()[-1]) / 1024
    g = peak["sgemm_gflops"]
    print(f"| {label} | {kiln:.3f} | {t['steps_per_second']:.3f} | {kiln / t['steps_per_second']:.2f}x | "
          f"{kiln * flop:.1f} ({100 * kiln * flop / g:.0f}%) | {t['steps_per_second'] * flop:.1f} "
          f"({100 * t['steps_per_second'] * flop / g:.0f}%) | {rss:.0f} / {t['peak_rss_mib']:.0f} |")
PY
