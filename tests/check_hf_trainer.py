"""transformers' Trainer side of tests/trainer_parity.rs: the same run as a kiln one,
from the same initial folder, and the distance between the two results.

Each job: {"init": folder both runs start from, "kiln": kiln's output folder, "out":
where transformers saves, "rows": JSONL file, "n": rows taken (the first n, as
max_train_samples), optionally "eval_rows"/"eval_n" the same for evaluation,
"max_length", "args": TrainingArguments keywords}. A BERT
classifier on full batches (one batch is every row, so the sampler's order cannot
matter), DataCollatorWithPadding, dropout off in the folder's config. Returns
transformers' log_history and the largest difference between its weights and kiln's
(and between kiln's and those of the folder "other", when given)."""

import json
import sys

try:
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments)
except ImportError as e:
    print(json.dumps({"skip": f"cannot import torch/transformers: {e}"}))
    sys.exit(0)

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)


def run(job):
    tok = AutoTokenizer.from_pretrained(job["init"])
    model = AutoModelForSequenceClassification.from_pretrained(job["init"], dtype=torch.float32)
    label2id = model.config.label2id

    def encode(path, n):
        rows = [json.loads(l) for l in open(path) if l.strip()][:n]
        return [dict(tok(r["text"], truncation=True, max_length=job["max_length"]), labels=label2id[r["label"]])
                for r in rows]

    data = encode(job["rows"], job["n"])
    evals = encode(job["eval_rows"], job["eval_n"]) if "eval_rows" in job else None
    args = TrainingArguments(output_dir=job["out"], save_strategy="no", eval_strategy="no", report_to="none",
                             disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, **job["args"])
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=evals,
                      data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    trainer.save_model(job["out"])
    ours = load_file(f"{job['out']}/model.safetensors")
    theirs = load_file(f"{job['kiln']}/model.safetensors")
    diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    moved = max(float((ours[k] - init[k]).abs().max()) for init in [load_file(f"{job['init']}/model.safetensors")] for k in ours)
    result = {"log_history": trainer.state.log_history, "max_diff": diff, "moved": moved,
              "missing": sorted(set(ours) ^ set(theirs))}
    if "other" in job:
        other = load_file(f"{job['other']}/model.safetensors")
        result["other_diff"] = max(float((theirs[k] - other[k]).abs().max()) for k in theirs)
    return result


def run_sft(job):
    """A causal LM fine-tuned by TRL's SFTTrainer on prompt/completion rows (kiln's
    tokenization of them is checked against TRL's in datasets/tests/sft_interop.rs)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(job["init"])
    model = AutoModelForCausalLM.from_pretrained(job["init"], dtype=torch.float32)
    rows = [json.loads(l) for l in open(job["rows"]) if l.strip()][: job["n"]]
    args = SFTConfig(output_dir=job["out"], save_strategy="no", eval_strategy="no", report_to="none",
                     disable_tqdm=True, use_cpu=True, bf16=False, dataloader_num_workers=0, **job["args"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    trainer.save_model(job["out"])
    ours = load_file(f"{job['out']}/model.safetensors")
    theirs = load_file(f"{job['kiln']}/model.safetensors")
    diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    result = {"log_history": trainer.state.log_history, "max_diff": diff, "missing": sorted(set(ours) ^ set(theirs))}
    if "other" in job:
        other = load_file(f"{job['other']}/model.safetensors")
        result["other_diff"] = max(float((theirs[k] - other[k]).abs().max()) for k in theirs)
    return result


def main():
    jobs = json.load(open(sys.argv[1]))
    print(json.dumps({"results": [run_sft(j) if j.get("kind") == "sft" else run(j) for j in jobs]}))


if __name__ == "__main__":
    main()
