"""transformers' side of tests/sampler_parity.rs. A job {"order", "lengths",
"batch_size"}: get_length_grouped_indices (what LengthGroupedSampler yields) on kiln's
permutation, given to it as torch.randperm's result. A job {"trainer": {"n", "batch_size",
"seed", "data_seed", "epochs"}}: the example indices transformers' Trainer feeds its
model, in order, over that many epochs of a real train() (its default random sampler).
One JSON line out."""

import json
import sys

try:
    import torch
    from transformers import trainer_pt_utils
except ImportError as e:
    print(json.dumps({"skip": f"cannot import torch/transformers: {e}"}))
    sys.exit(0)


def trainer_order(job):
    import tempfile

    from transformers import Trainer, TrainingArguments

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, index=None, labels=None):
            seen.extend(index.tolist())
            return {"loss": (self.w * 0.0).sum() + 1.0}

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return job["n"]

        def __getitem__(self, i):
            return {"index": i}

    steps = job["epochs"] * -(-job["n"] // job["batch_size"])
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=job["batch_size"], max_steps=steps,
                                 seed=job["seed"], data_seed=job["data_seed"], use_cpu=True, report_to="none",
                                 save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, logging_steps=10**6)
        collate = lambda rows: {"index": torch.tensor([r["index"] for r in rows])}
        Trainer(model=Recorder(), args=args, train_dataset=Examples(), data_collator=collate).train()
    return seen


def run(job):
    if "trainer" in job:
        return trainer_order(job["trainer"])
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
