"""transformers' side of tests/sampler_parity.rs: get_length_grouped_indices (what
LengthGroupedSampler yields) on kiln's permutation, given to it as torch.randperm's
result. Each job: {"order", "lengths", "batch_size"}; one JSON line out."""

import json
import sys

try:
    import torch
    from transformers import trainer_pt_utils
except ImportError as e:
    print(json.dumps({"skip": f"cannot import torch/transformers: {e}"}))
    sys.exit(0)


def run(job):
    order = torch.tensor(job["order"])
    real = torch.randperm
    torch.randperm = lambda n, generator=None: order.clone()
    try:
        return trainer_pt_utils.get_length_grouped_indices(job["lengths"], job["batch_size"])
    finally:
        torch.randperm = real


def main():
    jobs = json.load(open(sys.argv[1]))
    print(json.dumps({"results": [run(j) for j in jobs]}))


if __name__ == "__main__":
    main()
