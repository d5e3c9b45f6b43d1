"""peft + torch eager on the runs of benches/lora_memory.sh: a full fine-tune and a LoRA
fine-tune (r 16, alpha 32, all-linear, peft's get_peft_model) of the same base folder
kiln saved, with its tokenizer, blocks and batch size, in a plain AdamW loop with
gradient clipping. Each in a fresh process, for its peak RSS.

Usage: python benches/lora_compare.py BASE_DIR STEPS BLOCK BATCH full|lora
Prints one JSON line: steps/s, peak RSS (MiB), trainable parameters.
"""
import json
import resource
import sys
import time

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

base, steps, block, batch, mode = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(base)
model = LlamaForCausalLM.from_pretrained(base, attn_implementation="eager", dtype=torch.float32)
if mode == "lora":
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
    model = get_peft_model(model, config)
ids = [t for line in open("data/corpus/train.txt") for t in tok(line)["input_ids"]]
blocks = [ids[i:i + block] for i in range(0, len(ids) - block + 1, block)]
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
model.train()


def step(i):
    rows = [blocks[(i * batch + j) % len(blocks)] for j in range(batch)]
    x = torch.tensor(rows)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


for i in range(2):  # warm-up
    step(i)
start = time.perf_counter()
for i in range(steps):
    step(i)
sps = steps / (time.perf_counter() - start)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"steps_per_second": sps, "peak_rss_mib": rss,
                  "trainable": sum(p.numel() for p in params), "torch": torch.__version__}))
