#!/usr/bin/env bash
# A full fine-tune against a LoRA fine-tune (r 16, all-linear) of the same Llama base
# (hidden 256 × 4 layers, intermediate 688, blocks of 128 tokens, batch 8, AdamW, f32, 2
# threads): peak RSS of the whole process (/usr/bin/time), steps/s, trainable
# parameters, and the optimizer state each checkpoint holds; then the same two runs in
# torch eager with peft (benches/lora_compare.py), side by side.
# Usage: benches/lora_memory.sh [STEPS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
steps="${1:-10}"
root="target/lora-memory"
rm -rf "$root"
cargo build --release -q -p kiln-cli
export RAYON_NUM_THREADS=2
sizes=(--hidden_size 256 --intermediate_size 688 --num_hidden_layers 4 --num_attention_heads 4
    --num_key_value_heads 2 --max_position_embeddings 256 --block_size 128
    --per_device_train_batch_size 8 --max_grad_norm 1.0)
quiet=(--eval_strategy no --load_best_model_at_end false --metric_for_best_model none
    --disable_tqdm true --save_strategy steps)
echo "+ the base: kiln train data/configs/llama-corpus.toml ${sizes[*]} --max_steps 1" >&2
target/release/kiln train data/configs/llama-corpus.toml "${sizes[@]}" "${quiet[@]}" \
    --output_dir "$root/base" --max_steps 1 --save_steps 1 >/dev/null 2>&1
run() { # name, extra flags...
    local name=$1; shift
    /usr/bin/time -f "%M" -o "$root/$name.rss" target/release/kiln train data/configs/llama-corpus.toml \
        "${sizes[@]}" "${quiet[@]}" --model "$root/base" --output_dir "$root/$name" \
        --max_steps "$steps" --save_steps "$steps" --learning_rate 1e-4 "$@" >/dev/null 2>"$root/$name.err"
}
echo "+ full fine-tune, $steps steps" >&2
run full
echo "+ LoRA fine-tune: --use_peft true --lora_r 16 --lora_alpha 32 --lora_target_modules all-linear, $steps steps" >&2
run lora --use_peft true --lora_r 16 --lora_alpha 32 --lora_target_modules all-linear
grep "trainable params" "$root/lora.err" >&2 || true
py="${KILN_PYTHON:-$HOME/.cache/kiln/venv/bin/python}"
echo "+ torch eager + peft, same base, tokenizer, blocks and steps" >&2
torch_full=$("$py" benches/lora_compare.py "$root/base" "$steps" 128 8 full 2>/dev/null | tail -n 1)
torch_lora=$("$py" benches/lora_compare.py "$root/base" "$steps" 128 8 lora 2>/dev/null | tail -n 1)
python3 - "$root" "$steps" "$torch_full" "$torch_lora" <<'PY'
import json, os, sys
root, steps = sys.argv[1], sys.argv[2]
tf, tl = json.loads(sys.argv[3]), json.loads(sys.argv[4])
def stats(name):
    h = json.load(open(f"{root}/{name}/trainer_state.json"))["log_history"]
    sps = [e for e in h if "train_steps_per_second" in e][-1]["train_steps_per_second"]
    rss = int(open(f"{root}/{name}.rss").read().split()[-1]) / 1024
    opt = os.path.getsize(f"{root}/{name}/checkpoint-{steps}/optimizer.safetensors") / 2**20
    return sps, rss, opt
fs, fr, fo = stats("full")
ls, lr, lo = stats("lora")
print(f"Llama h256 x4, seq 128, batch 8, 2 threads, {steps} steps:")
print(f"  full: {fs:.3f} steps/s, peak RSS {fr:.0f} MiB, optimizer state {fo:.2f} MiB")
print(f"  LoRA: {ls:.3f} steps/s, peak RSS {lr:.0f} MiB, optimizer state {lo:.2f} MiB")
print(f"  LoRA/full: speed {ls / fs:.2f}x, peak RSS {lr / fr:.2f}x, optimizer state {lo / fo:.4f}x")
print(f"torch {tl['torch']} eager (+ peft for LoRA), same sizes:")
print(f"  full: {tf['steps_per_second']:.3f} steps/s, peak RSS {tf['peak_rss_mib']:.0f} MiB")
print(f"  LoRA: {tl['steps_per_second']:.3f} steps/s, peak RSS {tl['peak_rss_mib']:.0f} MiB ({tl['trainable']:,} trainable)")
print(f"kiln/torch: full {fs / tf['steps_per_second']:.2f}x, LoRA {ls / tl['steps_per_second']:.2f}x steps/s; "
      f"peak RSS full {fr / tf['peak_rss_mib']:.2f}x, LoRA {lr / tl['peak_rss_mib']:.2f}x")
PY
