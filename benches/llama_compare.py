"""torch eager on the same Llama run as `kiln train` (benches/llama_compare.sh): the model
of the config.json kiln saved (transformers' LlamaForCausalLM, eager attention, f32),
the same tokenizer, blocks and batch size, a plain AdamW loop; then greedy generation
with `generate` from the weights kiln trained.

Usage: python benches/llama_compare.py KILN_OUTPUT_DIR STEPS BLOCK BATCH NEW_TOKENS
Prints one JSON line: torch's steps/s and generated tokens/s.
"""
import json
import sys
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

out, steps, block, batch, new_tokens = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(out)
cfg = json.load(open(f"{out}/config.json"))
keys = {k: v for k, v in cfg.items() if k not in ("architectures", "kiln_version", "dtype")}
torch.manual_seed(42)
model = LlamaForCausalLM(LlamaConfig(**keys), ).float()
model.config._attn_implementation = "eager"
ids = [t for line in open("data/corpus/train.txt") for t in tok(line)["input_ids"]]
blocks = [ids[i:i + block] for i in range(0, len(ids) - block + 1, block)]
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
model.train()


def step(i):
    rows = [blocks[(i * batch + j) % len(blocks)] for j in range(batch)]
    x = torch.tensor(rows)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


for i in range(2):  # warm-up
    step(i)
start = time.perf_counter()
for i in range(steps):
    step(i)
train_sps = steps / (time.perf_counter() - start)

trained = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
prompt = tok("once upon a time", return_tensors="pt")["input_ids"]
with torch.no_grad():
    trained.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
    start = time.perf_counter()
    gen = trained.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           do_sample=False, min_new_tokens=new_tokens)
    took = time.perf_counter() - start
print(json.dumps({"train_steps_per_second": train_sps, "generated": gen[0].tolist(),
                  "generate_tokens_per_second": (gen.shape[1] - prompt.shape[1]) / took,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))
