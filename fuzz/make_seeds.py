#!/usr/bin/env python3
"""Writes the seed corpora fuzz/corpus/<target>/ from the repository's own fixtures.

Standard library only. Seeds are small valid and near-valid files: the torch and
safetensors fixtures (tests/fixtures/torch), the hostile files (tests/attacks), the
model folders (checkpoint/tests/fixtures, data/tiny-gpt2), the `data.pkl` streams cut
out of the zips, and a few files made here (an optimizer state, shard indexes that name
the shards the harness puts beside them). Files over 64 KiB are left out.

    python3 fuzz/make_seeds.py          # adds seeds-* files; existing files are kept

`fuzz/run.sh TARGET cmin` then minimizes each corpus together with what runs found.
"""

import hashlib
import json
import struct
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
MAX = 64 * 1024


def add(target, data, name=None):
    if len(data) > MAX:
        return
    out = CORPUS / target
    out.mkdir(parents=True, exist_ok=True)
    name = name or hashlib.sha1(data).hexdigest()[:16]
    (out / f"seed-{name}").write_bytes(data)


def files(folder, pattern):
    return sorted(p for p in (ROOT / folder).glob(pattern) if p.is_file())


def safetensors(tensors, metadata=None):
    """A safetensors file: tensors = [(name, dtype, shape, bytes)]."""
    header, off, data = {}, 0, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def main():
    st = files("tests/fixtures/torch", "*.safetensors") + files("tests/attacks", "*.safetensors")
    st += files("checkpoint/tests/fixtures", "*/*.safetensors")
    pt = files("tests/fixtures/torch", "*.pt") + files("tests/attacks", "*.pt")
    pt += files("tests/fixtures/torch", "*/*.bin")
    for p in st:
        add("safetensors", p.read_bytes(), p.stem)
        add("inspect", p.read_bytes(), p.stem)
    for p in pt:
        add("zip", p.read_bytes(), p.stem)
        add("inspect", p.read_bytes(), p.stem)
        if zipfile.is_zipfile(p):
            try:
                with zipfile.ZipFile(p) as z:
                    for n in z.namelist():
                        if n.endswith("data.pkl"):
                            add("pickle", z.read(n), p.stem)
            except Exception:  # hostile zips: the file itself is the seed
                pass
        else:
            add("pickle", p.read_bytes(), p.stem)

    # Shard indexes: the real ones, and ones naming the shards the harness writes.
    for p in files("checkpoint/tests/fixtures", "*/*.index.json") + files(
        "tests/attacks", "*/*.index.json"
    ) + files("tests/fixtures/torch", "*/*.index.json") + files("data", "*/*.index.json"):
        add("shard_index", p.read_bytes(), p.parent.name)
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
          "c": "model-00002-of-00002.safetensors", "d": "model-00002-of-00002.safetensors"}
    index = {"metadata": {"total_parameters": 15, "total_size": 48}, "weight_map": wm}
    add("shard_index", json.dumps(index, indent=2, sort_keys=True).encode(), "harness_shards")
    add("inspect", json.dumps(index, indent=2, sort_keys=True).encode(), "harness_index")
    bin_index = {"metadata": {}, "weight_map": {"e": "pytorch_model-00001-of-00001.bin",
                                                "f": "pytorch_model-00001-of-00001.bin"}}
    add("shard_index", json.dumps(bin_index).encode(), "harness_bin")
    mixed = dict(wm, e="pytorch_model-00001-of-00001.bin")
    add("shard_index", json.dumps({"weight_map": mixed}).encode(), "harness_mixed")

    for p in files("checkpoint/tests/fixtures", "*/config.json") + files("data", "*/config.json"):
        add("config", p.read_bytes(), p.parent.name)
    for p in files("checkpoint/tests/fixtures", "*/generation_config.json"):
        add("config", p.read_bytes(), "generation_" + p.parent.name)

    for p in files("checkpoint/tests/fixtures", "trainer_state*.json"):
        add("trainer_state", p.read_bytes(), p.stem)
    add("trainer_state", b'{"global_step": 3, "log_history": [{"loss": NaN, "grad_norm": '
        b'Infinity, "step": 1}, {"eval_loss": 1e-05, "step": 2}], "best_metric": -0.5}',
        "nan_inf")

    # An optimizer state as OptimizerState::save writes it.
    f32 = struct.pack("<4f", 0.5, -1.0, 2.0, 1e-8)
    meta = json.dumps({"kind": "adamw", "meta": {"lr": 0.001, "step": 7, "betas": [0.9, 0.999]}})
    opt = safetensors(
        [("w.exp_avg", "F32", [2, 2], f32), ("w.exp_avg_sq", "F32", [4], f32),
         ("head.bias.exp_avg", "BF16", [2], b"\x80\x3f\x00\x40")],
        {"format": "kiln-optimizer", "kiln.optimizer": meta},
    )
    add("optimizer", opt, "adamw")
    add("inspect", opt, "optimizer")
    add("optimizer", safetensors([], {"format": "kiln-optimizer",
                                      "kiln.optimizer": '{"kind":"sgd","meta":null}'}), "empty")


if __name__ == "__main__":
    main()
