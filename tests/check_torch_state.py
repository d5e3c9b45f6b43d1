"""torch's side of tests/torch_state.rs: loads the optimizer.pt, scheduler.pt and
scaler.pt kiln wrote with torch.load(weights_only=True) into the objects transformers'
Trainer restores them into (an AdamW over the fixture's model grouped as
create_optimizer groups it, a LambdaLR from get_linear_schedule_with_warmup, a
GradScaler), takes one more step, and reports the sha256 of each moment by parameter
name (decay group first, then no-decay, as the indices run).

Each job: {"dir": folder with kiln's three files, "manifest": the fixture's
manifest.json}. One JSON line out."""

import collections
import hashlib
import json
import os
import sys

try:
    import torch
    from transformers import get_linear_schedule_with_warmup
except ImportError as e:
    print(json.dumps({"skip": f"cannot import torch/transformers: {e}"}))
    sys.exit(0)


def run(job):
    manifest = json.load(open(job["manifest"]))
    torch.manual_seed(0)
    model = torch.nn.Sequential(collections.OrderedDict(
        [("fc", torch.nn.Linear(4, 3)), ("norm", torch.nn.LayerNorm(3)), ("head", torch.nn.Linear(3, 2))]))
    params = dict(model.named_parameters())
    decay = [p["name"] for p in manifest["params"] if p["decay"]]
    no_decay = [p["name"] for p in manifest["params"] if not p["decay"]]
    groups = [{"params": [params[n] for n in decay], "weight_decay": 0.01},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, fused=True)
    sched = get_linear_schedule_with_warmup(opt, 1, 10)
    sd = torch.load(os.path.join(job["dir"], "optimizer.pt"), weights_only=True)
    opt.load_state_dict(sd)
    sched.load_state_dict(torch.load(os.path.join(job["dir"], "scheduler.pt"), weights_only=True))
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(torch.load(os.path.join(job["dir"], "scaler.pt"), weights_only=True))

    def digest(t):
        return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()

    order = decay + no_decay
    state = {order[i]: {"step": float(s["step"]), "step_dtype": str(s["step"].dtype), "exp_avg": digest(s["exp_avg"]),
                        "exp_avg_sq": digest(s["exp_avg_sq"])} for i, s in sd["state"].items()}
    groups_out = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in sd["param_groups"]]
    lr_before = opt.param_groups[0]["lr"]
    model(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    sched.step()
    return {"state": state, "param_groups": groups_out, "lr": lr_before, "last_epoch": sched.last_epoch,
            "scale": scaler.get_scale(), "growth_tracker": scaler._get_growth_tracker()}


def main():
    jobs = json.load(open(sys.argv[1]))
    print(json.dumps({"results": [run(j) for j in jobs]}))


if __name__ == "__main__":
    main()
