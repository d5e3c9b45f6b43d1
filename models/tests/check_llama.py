"""The Llama family (Llama, Mistral, Qwen2, Qwen3) against real transformers, both ways;
called by models/tests/hf_llama.rs (one run for all jobs: importing torch takes seconds).

Usage: python check_llama.py JOBS.json
Each job is either
  {"load": DIR, "inputs": {...}, "labels": [[...]], "generate": {"prompt", "max_new_tokens"}}
    a folder kiln wrote: loaded with AutoModelForCausalLM (eager attention, eval mode);
    reports missing/unexpected keys, logits, loss, every gradient and the greedy tokens;
or
  {"make": DIR, "config": {...}, "seed": N, "dtype": "bfloat16", "max_shard_size": "20kB", ...}
    a folder transformers writes: a fresh model of that config saved in that dtype and
    sharded; reports the logits, loss and greedy tokens of the saved weights in float32.
Prints one JSON line: {"results": [...]} or {"skip": "<reason>"}.
"""
import json
import sys


def run(model, job, torch):
    inputs = {k: torch.tensor(v) for k, v in job["inputs"].items()}
    labels = torch.tensor(job["labels"], dtype=torch.int64)
    model.zero_grad()
    out = model(**inputs, labels=labels)
    out.loss.backward()
    result = {
        "logits": out.logits.tolist(),
        "loss": out.loss.item(),
        "grads": {
            name: p.grad.flatten().tolist()
            for name, p in model.named_parameters()
            if p.grad is not None
        },
    }
    g = job["generate"]
    prompt = torch.tensor(g["prompt"])
    with torch.no_grad():
        result["generate"] = model.generate(
            prompt, attention_mask=torch.ones_like(prompt),
            max_new_tokens=g["max_new_tokens"], do_sample=False,
        ).tolist()
    return result


def to_bin_shards(folder, torch):
    """Rewrites a safetensors folder as the sharded `.bin` transformers 4.x wrote
    (transformers 5 saves only safetensors): two `pytorch_model-*.bin` shards and
    `pytorch_model.bin.index.json`."""
    import glob
    import os
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(folder, "model*.safetensors")))
    state = {}
    for f in files:
        state.update(load_file(f))
        os.remove(f)
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        os.remove(index_path)
    names = list(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        shard = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: state[n].clone() for n in part}, os.path.join(folder, shard))
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


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
        if "load" in job:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                job["load"], output_loading_info=True, attn_implementation="eager",
                dtype=torch.float32,
            )
            model.eval()
            result = run(model, job, torch)
            result.update({
                "architecture": type(model).__name__,
                "missing": sorted(info["missing_keys"]),
                "unexpected": sorted(info["unexpected_keys"]),
                "mismatched": sorted(str(m) for m in info["mismatched_keys"]),
            })
        else:
            config = transformers.AutoConfig.for_model(**job["config"])
            torch.manual_seed(job["seed"])
            model = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation="eager"
            )
            # Larger weights than the 0.02 default (as kiln's side, initializer_range 0.1), so that the logits carry signal.
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() > 1:
                        p.normal_(0.0, 0.1)
            model = model.to(getattr(torch, job["dtype"]))
            model.save_pretrained(job["make"], max_shard_size=job["max_shard_size"])
            if not job.get("safe", True):
                to_bin_shards(job["make"], torch)
            # transformers' own float32 reading of the folder (the rotary buffers, cast
            # to bf16 above, are rebuilt on load).
            model = transformers.AutoModelForCausalLM.from_pretrained(
                job["make"], attn_implementation="eager", dtype=torch.float32
            ).eval()
            result = run(model, job, torch)
        results.append(result)
    print(json.dumps({"results": results}))


main()
