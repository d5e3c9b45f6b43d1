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


# GGUF value types (gguf-py's GGUFValueType) and the struct codes of the scalars.
GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_value(ty, v):
    if ty == 8:
        b = v.encode()
        return struct.pack("<Q", len(b)) + b
    if ty == 9:
        item_ty, items = v
        return struct.pack("<IQ", item_ty, len(items)) + b"".join(gguf_value(item_ty, i) for i in items)
    return struct.pack("<" + GGUF_SCALAR[ty], v)


def gguf(kv, tensors, version=3, alignment=32):
    """A GGUF file: kv = [(key, type, value)], tensors = [(name, row-major shape,
    ggml type id, bytes)], each tensor's data aligned."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kv))
    for k, ty, v in kv:
        out += gguf_value(8, k) + struct.pack("<I", ty) + gguf_value(ty, v)
    off, data = 0, b""
    for name, shape, ty, raw in tensors:
        out += gguf_value(8, name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", ty, off)
        pad = -len(raw) % alignment
        data += raw + b"\0" * pad
        off += len(raw) + pad
    out += b"\0" * (-len(out) % alignment)
    return out + data


def gguf_seeds():
    f32 = struct.pack("<8f", 0.5, -1.0, 2.0, 1e-8, 3.0, -0.25, 0.0, 7.5)
    # One Q8_0 block: an f16 scale (1.0) and 32 int8s.
    q8 = struct.pack("<H", 0x3C00) + bytes(range(0, 64, 2))
    kv = [
        ("general.architecture", 8, "llama"),
        ("general.name", 8, "seed"),
        ("llama.block_count", 4, 1),
        ("llama.rope.freq_base", 6, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", 6, 1e-6),
        ("general.file_type", 4, 7),
        ("tokenizer.ggml.model", 8, "gpt2"),
        ("tokenizer.ggml.tokens", 9, (8, ["a", "b", "<|endoftext|>"])),
        ("tokenizer.ggml.token_type", 9, (5, [1, 1, 3])),
        ("tokenizer.ggml.merges", 9, (8, ["a b"])),
        ("tokenizer.ggml.add_bos_token", 7, False),
        ("scalars.u8", 0, 255), ("scalars.i8", 1, -128), ("scalars.u16", 2, 65535),
        ("scalars.i16", 3, -1), ("scalars.u64", 10, 2**63), ("scalars.i64", 11, -(2**40)),
        ("scalars.f64", 12, 0.1), ("nested", 9, (9, [(4, [1, 2]), (8, ["x"])])),
        ("empty", 9, (4, [])),
    ]
    tensors = [
        ("token_embd.weight", [3, 8], 0, f32 * 3),
        ("blk.0.attn_norm.weight", [8], 0, f32),
        ("blk.0.ffn_down.weight", [1, 32], 8, q8),
        ("blk.0.ffn_up.weight", [2, 4], 1, struct.pack("<8H", *([0x3C00, 0xBC00] * 4))),
        ("blk.0.ffn_gate.weight", [4, 2], 30, struct.pack("<8H", *([0x3F80, 0x4000] * 4))),
        ("blk.0.attn_q.weight", [1, 1, 2, 32], 2, bytes(18) * 2),
        ("ids", [4], 24, bytes([1, 2, 255, 128])),
        ("count", [2], 27, struct.pack("<2q", -5, 2**40)),
    ]
    add("gguf", gguf(kv, tensors), "all_types")
    add("inspect", gguf(kv, tensors), "gguf")
    add("gguf", gguf(kv[:3], tensors[1:2], version=2), "version2")
    add("gguf", gguf(kv + [("general.alignment", 4, 64)], tensors[:3], alignment=64), "align64")
    add("gguf", gguf([], []), "empty")


def main():
    gguf_seeds()
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
