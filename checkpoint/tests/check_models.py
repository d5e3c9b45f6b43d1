"""Loads model folders written by kiln with real transformers and compares them with the
originals; called by checkpoint/tests/model_dir.rs (one invocation for all folders, since
importing torch takes seconds).

Usage: python check_models.py JOBS.json
JOBS.json: [{"dir": ..., "original": ..., "auto": "AutoModelForCausalLM", "tied": [[t, s]],
             "file_sharing": false}]
With "file_sharing", every .bin file in "dir" is also read with torch.load(weights_only=True)
and "unshared_in_file" lists the tied pairs (in one file) that do not share one storage.
Prints one JSON line: {"results": [...]} or {"skip": "<reason>"}.
"""
import json
import logging
import sys
import warnings


def main():
    jobs = json.load(open(sys.argv[1]))
    try:
        import torch
        import transformers
    except ImportError as e:
        print(json.dumps({"skip": f"cannot import torch/transformers: {e}"}))
        return
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(f"{record.name}: {record.getMessage()}")

    logging.getLogger("transformers").addHandler(Collect(level=logging.WARNING))
    originals = {}
    results = []
    for job in jobs:
        cls = getattr(transformers, job["auto"])
        key = (job["auto"], job["original"])
        if key not in originals:
            originals[key] = cls.from_pretrained(job["original"]).state_dict()
        original = originals[key]
        messages.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = cls.from_pretrained(job["dir"], output_loading_info=True)
        state = model.state_dict()
        different = sorted(
            [k for k in original if k not in state or not torch.equal(state[k], original[k])]
            + [k for k in state if k not in original]
        )
        untied = [t for t, s in job["tied"] if state[t].data_ptr() != state[s].data_ptr()]
        unshared = []
        if job.get("file_sharing"):
            import pathlib

            for f in sorted(pathlib.Path(job["dir"]).glob("*.bin")):
                sd = torch.load(f, weights_only=True)
                for t, s in job["tied"]:
                    if t in sd and s in sd:
                        if sd[t].untyped_storage().data_ptr() != sd[s].untyped_storage().data_ptr():
                            unshared.append(f"{f.name}: {t} / {s}")
                    elif t in sd or s in sd:
                        unshared.append(f"{f.name}: {t} / {s} in different files")
        results.append({
            "unshared_in_file": unshared,
            "dir": job["dir"],
            "class": type(model).__name__,
            "missing": sorted(info.get("missing_keys", [])),
            "unexpected": sorted(info.get("unexpected_keys", [])),
            "mismatched": sorted(str(m) for m in info.get("mismatched_keys", [])),
            "errors": [str(e) for e in info.get("error_msgs", [])],
            "different": different,
            "compared": len(original),
            "untied": untied,
            "warnings": messages + [f"{w.category.__name__}: {w.message}" for w in caught],
        })
    print(json.dumps({"results": results}))


main()
