"""Makes data/tiny-gpt2: a randomly initialised GPT-2 (seed 0) saved by transformers
with `save_pretrained(max_shard_size="100KB")`, i.e. sharded safetensors with an
index, as the bundled input of the README's first command.

Run with the interop venv: ~/.cache/kiln/venv/bin/python data/make_tiny_gpt2.py
"""
import pathlib

import torch
import transformers

out = pathlib.Path(__file__).parent / "tiny-gpt2"
torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=255, eos_token_id=255)
model = transformers.GPT2LMHeadModel(config)
model.save_pretrained(out, max_shard_size="100KB")
print("wrote", sorted(p.name for p in out.iterdir()))
