"""transformers' Trainer side of tests/hf_resume.rs: runs that start from a folder,
save checkpoints as transformers saves them, or resume a checkpoint (kiln's or its
own), on full batches (every step takes every row, so the sampler's order cannot
matter), dropout off in the folder's config.

Each job: {"model": "bert" | "gpt2", "init": folder, "rows": JSONL file (a "text"
column, and "label" for BERT), "n": examples taken (BERT: the first n rows; GPT-2: the
first n blocks of "block_size" tokens, as run_clm's group_texts cuts the rows),
"max_length" or "block_size", "out": output_dir, "args": TrainingArguments keywords,
"resume": a checkpoint folder or null, "compare": {name: model folder}}.
Returns, per job, log_history, the files of each checkpoint-N it saved, and for each
"compare" folder the largest difference between its weights and the final ones."""

import json
import os
import sys

try:
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments, default_data_collator)
except ImportError as e:
    print(json.dumps({"skip": f"cannot import torch/transformers: {e}"}))
    sys.exit(0)

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)


def data(job, tok, model):
    rows = [json.loads(l) for l in open(job["rows"]) if l.strip()]
    if job["model"] == "bert":
        label2id = model.config.label2id
        return [dict(tok(r["text"], truncation=True, max_length=job["max_length"]), labels=label2id[r["label"]])
                for r in rows[: job["n"]]], DataCollatorWithPadding(tok)
    ids = [i for r in rows for i in tok(r["text"])["input_ids"]]
    size = job["block_size"]
    blocks = [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)][: job["n"]]
    return [{"input_ids": b, "labels": list(b)} for b in blocks], default_data_collator


def weights(folder):
    path = os.path.join(folder, "model.safetensors")
    return load_file(path)


def run(job):
    tok = AutoTokenizer.from_pretrained(job["init"])
    cls = AutoModelForSequenceClassification if job["model"] == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(job["init"], dtype=torch.float32)
    rows, collator = data(job, tok, model)
    args = TrainingArguments(output_dir=job["out"], eval_strategy="no", report_to="none", disable_tqdm=True,
                             use_cpu=True, dataloader_num_workers=0, **job["args"])
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    trainer.train(resume_from_checkpoint=job.get("resume"))
    final = os.path.join(job["out"], "final")
    trainer.save_model(final)
    ours = weights(final)
    result = {"log_history": trainer.state.log_history, "global_step": trainer.state.global_step,
              "checkpoints": {}, "diff": {}}
    for name in sorted(os.listdir(job["out"])):
        if name.startswith("checkpoint-"):
            result["checkpoints"][name] = sorted(os.listdir(os.path.join(job["out"], name)))
    for name, folder in job.get("compare", {}).items():
        theirs = weights(folder)
        shared = [k for k in ours if k in theirs]
        result["diff"][name] = max(float((ours[k] - theirs[k]).abs().max()) for k in shared)
    return result


def main():
    jobs = json.load(open(sys.argv[1]))
    print(json.dumps({"results": [run(j) for j in jobs]}))


if __name__ == "__main__":
    main()
