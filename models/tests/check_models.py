"""Loads model folders kiln wrote with real transformers and runs them; called by
models/tests/hf_models.rs (one invocation for all folders: importing torch takes
seconds).

Usage: python check_models.py JOBS.json
JOBS.json: [{"dir": ..., "auto": "AutoModelForSequenceClassification",
             "inputs": {"input_ids": [[...]], "attention_mask": [[...]], ...},
             "labels": [...] or null, "labels_dtype": "int64" | "float32",
             "generate": {"prompt": [[...]], "max_new_tokens": 6} or absent}]
Prints one JSON line: {"results": [{"missing": [...], "unexpected": [...],
"mismatched": [...], "architecture": ..., "logits": [...], "loss": x,
"generate": [[...]], "grads": {name: [...]}}]} or {"skip": "<reason>"}.
"""
import json
import sys


def main():
    jobs = json.load(open(sys.argv[1]))
    try:
        import torch
        import transformers
    except ImportError as e:
        print(json.dumps({"skip": f"cannot import torch/transformers: {e}"}))
        return
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    results = []
    for job in jobs:
        cls = getattr(transformers, job["auto"])
        model, info = cls.from_pretrained(job["dir"], output_loading_info=True)
        model.eval()
        inputs = {k: torch.tensor(v) for k, v in job["inputs"].items()}
        labels = None
        if job.get("labels") is not None:
            labels = torch.tensor(job["labels"], dtype=getattr(torch, job["labels_dtype"]))
        with torch.no_grad():
            out = model(**inputs, labels=labels)
        result = {
            "architecture": type(model).__name__,
            "missing": sorted(info["missing_keys"]),
            "unexpected": sorted(info["unexpected_keys"]),
            "mismatched": sorted(str(m) for m in info["mismatched_keys"]),
            "logits": out.logits.tolist(),
            "loss": None if out.loss is None else out.loss.item(),
            "problem_type": getattr(model.config, "problem_type", None),
        }
        # Gradients of the loss (eval mode: no dropout, as kiln's forward without an
        # Rng), by parameter name, for kiln's backward passes to be compared with torch's.
        if labels is not None:
            model.zero_grad()
            model(**inputs, labels=labels).loss.backward()
            result["grads"] = {
                name: p.grad.flatten().tolist()
                for name, p in model.named_parameters()
                if p.grad is not None
            }
        if "generate" in job:
            g = job["generate"]
            prompt = torch.tensor(g["prompt"])
            with torch.no_grad():
                generated = model.generate(
                    prompt, attention_mask=torch.ones_like(prompt),
                    max_new_tokens=g["max_new_tokens"], do_sample=False,
                )
            result["generate"] = generated.tolist()
        if model.config.tie_word_embeddings and hasattr(model, "lm_head"):
            result["tied_shares_storage"] = (
                model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
            )
        results.append(result)
    print(json.dumps({"results": results}))


main()
