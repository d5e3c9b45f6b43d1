"""The Python side of benches/compare.sh: one measurement per process, one JSON line out.

    py_io.py save-st LAYOUT PATH [--fsync]  build the tensors, time safetensors save_file
    py_io.py save-pt LAYOUT PATH [--fsync]  build the tensors, time torch.save
    py_io.py load-pt PATH [--mmap]        time torch.load(weights_only=True) + touching
                                          every byte (a checksum), then freeing it

LAYOUT is the JSON printed by `io_compare layout`: names and shapes of f32 tensors. The
values are those of benches/common/mod.rs, ((i * 7 + t) % 1021) / 1021 in f32, and the
checksum is common::checksum's, so kiln's and torch's checksums of the same file agree.
Saves report the resident set just before the save and the high-water mark during it
(reset through /proc/self/clear_refs first), like io_compare.
Neither save_file nor torch.save fsyncs; --fsync adds, inside the timing, an fsync of the
file and of its folder (what kiln's saves do, besides writing to a temporary name).
"""

import json
import os
import sys
import time

import numpy as np
import torch
import safetensors.torch


def status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def build(layout_path):
    with open(layout_path) as f:
        layout = json.load(f)
    tensors = {}
    for t, spec in enumerate(layout["tensors"]):
        shape = spec["shape"]
        n = int(np.prod(shape))
        i = np.arange(n, dtype=np.int64)
        v = ((i * 7 + t) % 1021).astype(np.float32) / np.float32(1021)
        tensors[spec["name"]] = torch.from_numpy(v.reshape(shape))
        del i
    return tensors


def fsync_file_and_folder(path):
    for p, flags in ((path, os.O_RDONLY), (os.path.dirname(os.path.abspath(path)), os.O_RDONLY)):
        fd = os.open(p, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(mode, layout_path, path, fsync):
    tensors = build(layout_path)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    rss_before = status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    start = time.perf_counter()
    if mode == "save-st":
        safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    else:
        torch.save(tensors, path)
    if fsync:
        fsync_file_and_folder(path)
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "fsync": fsync,
        "seconds": seconds,
        "tensor_bytes": tensor_bytes,
        "rss_before_kib": rss_before,
        "hwm_kib": status_kib("VmHWM"),
        "hwm_reset": hwm_reset,
    }


def checksum(t):
    """Wrapping sum of the bytes as little-endian u64 words, last partial word padded
    with zeros: what common::checksum computes in kiln."""
    b = t.contiguous().view(-1).view(torch.uint8)
    n = b.numel() // 8 * 8
    total = int(b[:n].view(torch.int64).sum()) if n else 0
    if n < b.numel():
        total += int.from_bytes(bytes(b[n:].tolist()).ljust(8, b"\0"), "little")
    return total % 2**64


def load(path, mmap):
    # kiln's checksum runs on one thread; so does this one (and torch's threads would
    # otherwise stall behind whatever else the machine runs).
    torch.set_num_threads(1)
    start = time.perf_counter()
    sd = torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
    total = 0
    nbytes = 0
    for t in sd.values():
        total = (total + checksum(t)) % 2**64
        nbytes += t.numel() * t.element_size()
    del sd, t
    seconds = time.perf_counter() - start
    return {
        "mode": "load-pt",
        "mmap": mmap,
        "seconds": seconds,
        "tensor_bytes": nbytes,
        "checksum": total,
    }


def main(argv):
    if len(argv) in (3, 4) and argv[0] in ("save-st", "save-pt") and argv[3:] in ([], ["--fsync"]):
        out = save(argv[0], argv[1], argv[2], argv[3:] == ["--fsync"])
    elif argv[:1] == ["load-pt"] and len(argv) in (2, 3) and argv[2:] in ([], ["--mmap"]):
        out = load(argv[1], argv[2:] == ["--mmap"])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
