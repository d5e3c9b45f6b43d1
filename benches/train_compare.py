"""transformers' Trainer on the same run as `kiln train CONFIG` for the bundled configs:
cli/bundled/bert-sentiment.toml (BertForSequenceClassification, DataCollatorWithPadding)
and data/configs/gpt2-corpus.toml (GPT2LMHeadModel, run_clm's blocks of 64 tokens).

Usage: python benches/train_compare.py KILN_OUTPUT_DIR STEPS
Reads the tokenizer and config.json that the kiln run saved (so both train the same
architecture on the same token ids), trains the model from scratch with the same batch
size, learning rate, schedule and steps on CPU, and prints one JSON line with
transformers' train_steps_per_second. Run by benches/train_compare.sh.
"""
import json
import sys

import torch
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification,
                          DataCollatorWithPadding, GPT2Config, GPT2LMHeadModel, Trainer,
                          TrainingArguments, default_data_collator)

out, steps = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(out)
cfg = json.load(open(f"{out}/config.json"))
keys = {k: v for k, v in cfg.items() if k not in ("architectures", "kiln_version", "dtype")}
torch.manual_seed(42)
if cfg["architectures"][0] == "GPT2LMHeadModel":
    # run_clm: tokenize every line, concatenate, cut into blocks of 64, labels = inputs.
    model = GPT2LMHeadModel(GPT2Config(**keys))
    ids = [t for line in open("data/corpus/train.txt") for t in tok(line)["input_ids"]]
    block = 64
    data = [{"input_ids": ids[i:i + block], "labels": ids[i:i + block]}
            for i in range(0, len(ids) - block + 1, block)]
    batch, collator = 16, default_data_collator
else:
    config = BertConfig(**keys)
    model = BertForSequenceClassification(config)
    rows = [json.loads(l) for l in open("cli/bundled/sentiment/train.jsonl") if l.strip()]
    data = [dict(tok(r["text"], truncation=True, max_length=64), labels=config.label2id[r["label"]])
            for r in rows]
    batch, collator = 32, DataCollatorWithPadding(tok)
args = TrainingArguments(
    output_dir="/tmp/kiln-train-compare-hf", max_steps=steps, per_device_train_batch_size=batch,
    learning_rate=1e-3, weight_decay=0.01, warmup_steps=20, lr_scheduler_type="linear",
    logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
    dataloader_num_workers=0, use_cpu=True, seed=42,
)
trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
metrics = trainer.train().metrics
print(json.dumps({"train_steps_per_second": metrics["train_steps_per_second"], "train_runtime": metrics["train_runtime"],
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))
