"""peft's side of tests/cli_lora.rs: loads kiln's adapters with peft, merges with
merge_and_unload, loads kiln's merged folders with from_pretrained, and writes adapters
with peft for kiln to load. Jobs come as a JSON list (argv[1]); one JSON line out:
{"results": [...]} in job order, or {"skip": reason} when peft is missing."""

import json
import sys

try:
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
except ImportError as e:  # a missing module is a skip, as for the other checkers
    print(json.dumps({"skip": f"cannot import peft/transformers: {e}"}))
    sys.exit(0)

transformers.logging.set_verbosity_error()


def auto(task):
    if task == "SEQ_CLS":
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM


def logits_of(model, ids, task):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits[0]
    return (out if task == "SEQ_CLS" else out[-1]).tolist()


def base_model(job):
    m = auto(job["task"]).from_pretrained(job["base"], torch_dtype=torch.float32)
    return m.eval()


def kiln_adapter(job):
    """kiln's adapter through peft: its logits, and those of merge_and_unload."""
    model = PeftModel.from_pretrained(base_model(job), job["adapter"]).eval()
    out = {"peft": logits_of(model, job["input_ids"], job["task"])}
    merged = model.merge_and_unload()
    out["merged"] = logits_of(merged, job["input_ids"], job["task"])
    if job.get("kiln_merged"):
        theirs = auto(job["task"]).from_pretrained(job["kiln_merged"]).eval()
        out["kiln_merged"] = logits_of(theirs, job["input_ids"], job["task"])
    return out


def peft_adapter(job):
    """An adapter trained by peft (a few AdamW steps on random tokens, dropout off) and
    saved with save_pretrained, and its logits."""
    torch.manual_seed(job.get("seed", 0))
    config = LoraConfig(task_type=job["task"], lora_dropout=0.0, **job["config"])
    model = get_peft_model(base_model(job), config)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (4, 12))
    if job["task"] == "SEQ_CLS":
        labels = torch.randint(0, model.config.num_labels, (4,))
    else:
        labels = ids
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=0.05)
    for _ in range(3):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(job["out"])
    return {"peft": logits_of(model, job["input_ids"], job["task"])}


def main():
    jobs = json.load(open(sys.argv[1]))
    kinds = {"kiln_adapter": kiln_adapter, "peft_adapter": peft_adapter}
    print(json.dumps({"results": [kinds[j["kind"]](j) for j in jobs]}))


if __name__ == "__main__":
    main()
