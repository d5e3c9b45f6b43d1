"""torch eager's side of benches/speed_compare.sh: the model of the config.json kiln
saved for each run (transformers' class, eager attention, f32, dropout as configured),
trained in a plain AdamW loop (clip 1.0) on random token ids of the same shapes, on the
same threads; steady-state steps/s (steps WARMUP..WARMUP+STEPS timed), the process's
peak RSS, and the best sgemm rate of torch on these cores (2048², the machine's
practical peak).

Usage: python benches/speed_compare.py JOB.json THREADS (one model a process, so that
its peak RSS is its own), or JOB.json holding [] for the sgemm peak.
JOB.json: [{"name", "dir": kiln's output folder, "kind": "bert" | "causal", "batch",
"seq", "warmup", "steps"}]. Prints one JSON line.
"""
import json
import resource
import sys
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

jobs = json.load(open(sys.argv[1]))
torch.set_num_threads(int(sys.argv[2]))
transformers.logging.set_verbosity_error()


def sgemm_peak():
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = 0.0
    for _ in range(8):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - start) / 1e9)
    return best


def run(job):
    cfg = AutoConfig.from_pretrained(job["dir"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(42)
    if job["kind"] == "bert":
        model = AutoModelForSequenceClassification.from_config(cfg).float()
    else:
        model = AutoModelForCausalLM.from_config(cfg).float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    b, t = job["batch"], job["seq"]
    gen = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)
        if job["kind"] == "bert":
            labels = torch.randint(0, cfg.num_labels, (b,), generator=gen)
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(job["warmup"]):
        step()
    start = time.perf_counter()
    for _ in range(job["steps"]):
        step()
    took = time.perf_counter() - start
    # A step's floating-point work: every dense layer's product (the LM head's too) at
    # every token, and attention's two products, forward and twice that backward.
    dense = sum(m.weight.numel() for m in model.modules()
                if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    forward = 2 * dense * b * t + 4 * layers * b * t * t * hidden
    return {"name": job["name"], "steps_per_second": job["steps"] / took, "gflop_per_step": 3 * forward / 1e9,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
if jobs:
    out["result"] = run(jobs[0])
else:
    out["sgemm_gflops"] = sgemm_peak()
print(json.dumps(out))
