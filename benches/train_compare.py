"""transformers' Trainer on the same BERT run as `kiln train data/configs/bert-sentiment.toml`.

Usage: python benches/train_compare.py KILN_OUTPUT_DIR STEPS
Reads the tokenizer and config.json that the kiln run saved (so both train the same
architecture on the same token ids), trains BertForSequenceClassification from scratch
with the same batch size, learning rate, schedule and steps on CPU, and prints one JSON
line with transformers' train_steps_per_second. Run by benches/train_compare.sh.
"""
import json
import sys

import torch
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification,
                          DataCollatorWithPadding, Trainer, TrainingArguments)

out, steps = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(out)
cfg = json.load(open(f"{out}/config.json"))
config = BertConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "kiln_version", "dtype")})
label2id = config.label2id
rows = [json.loads(l) for l in open("data/sentiment/train.jsonl") if l.strip()]
enc = [dict(tok(r["text"], truncation=True, max_length=64), labels=label2id[r["label"]]) for r in rows]
torch.manual_seed(42)
model = BertForSequenceClassification(config)
args = TrainingArguments(
    output_dir="/tmp/kiln-train-compare-hf", max_steps=steps, per_device_train_batch_size=32,
    learning_rate=1e-3, weight_decay=0.01, warmup_steps=20, lr_scheduler_type="linear",
    logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
    dataloader_num_workers=0, use_cpu=True, seed=42,
)
trainer = Trainer(model=model, args=args, train_dataset=enc, data_collator=DataCollatorWithPadding(tok))
metrics = trainer.train().metrics
print(json.dumps({"train_steps_per_second": metrics["train_steps_per_second"], "train_runtime": metrics["train_runtime"],
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))
