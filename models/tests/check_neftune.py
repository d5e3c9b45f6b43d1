"""transformers' side of the NEFTune test in models/src/layers.rs: the noise that
transformers' own hook (transformers.integrations.neftune.neftune_post_forward_hook)
adds to an embedding output of a given shape, summarised by its quantiles.

Usage: python check_neftune.py JOBS.json
JOBS.json: [{"shape": [b, t, d], "alpha": a, "seed": s}]
Prints one JSON line: {"results": [{"bound": alpha / sqrt(t * d), "max_abs": x,
"mean": x, "std": x, "quantiles": [q(0), q(0.01), ..., q(1)]}]} or {"skip": "<reason>"}.
"""
import json
import sys


def main():
    jobs = json.load(open(sys.argv[1]))
    try:
        import torch
        from transformers.integrations.neftune import neftune_post_forward_hook
    except ImportError as e:
        print(json.dumps({"skip": f"cannot import torch/transformers: {e}"}))
        return
    results = []
    for job in jobs:
        torch.manual_seed(job["seed"])
        b, t, d = job["shape"]
        module = torch.nn.Embedding(8, d)
        module.neftune_noise_alpha = job["alpha"]
        module.train()
        noise = neftune_post_forward_hook(module, None, torch.zeros(b, t, d)).flatten().double()
        q = torch.quantile(noise, torch.linspace(0, 1, 101, dtype=torch.float64))
        results.append({
            "bound": job["alpha"] / (t * d) ** 0.5,
            "max_abs": noise.abs().max().item(),
            "mean": noise.mean().item(),
            "std": noise.std().item(),
            "quantiles": q.tolist(),
        })
    print(json.dumps({"results": results}))


main()
