#!/usr/bin/env python3
"""Makes the hostile files in this folder. Plain Python 3; torch only for three of them.

    python3 tests/attacks/make_attacks.py
    /root/.cache/kiln/venv/bin/python tests/attacks/make_attacks.py   # all of them

Every file here must be refused by kiln with a one-line error that says what is wrong
(tests/attacks.rs holds the table of cases and the key word each error must contain).
Nothing here is ever unpickled or extracted by the tests: the pickles would run
commands (`touch /tmp/kiln-pwned-*`) if a reader executed them.

The zip archives are written by hand (not with `zipfile`) so that each one can be
malformed in exactly one way; apart from that one defect they follow the layout torch
writes: stored entries under one folder, `data.pkl`, `byteorder`, `data/<k>`, `version`.
"""

import os
import struct
import tarfile
import io
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------- pickle


def op_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def op_int(n):
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def op_tuple(items):
    items = list(items)
    if not items:
        return b")"
    if len(items) <= 3:
        return b"".join(items) + {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(items)]
    return b"(" + b"".join(items) + b"t"


def tensor_v2(key, numel, offset, size, stride, storage="FloatStorage"):
    """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`."""
    pid = op_tuple(
        [op_str("storage"), op_global("torch", storage), op_str(key), op_str("cpu"), op_int(numel)]
    )
    return (
        op_global("torch._utils", "_rebuild_tensor_v2")
        + b"("
        + pid
        + b"Q"
        + op_int(offset)
        + op_tuple(op_int(s) for s in size)
        + op_tuple(op_int(s) for s in stride)
        + b"\x89"
        + op_global("collections", "OrderedDict")
        + b")R"
        + b"tR"
    )


def state_dict(items):
    """A protocol-2 pickle of a dict {name: value-opcodes}."""
    body = b"".join(op_str(k) + v for k, v in items)
    return b"\x80\x02}(" + body + b"u."


def payload_call(module, name, arg):
    """module.name(arg) through GLOBAL + REDUCE."""
    return op_global(module, name) + op_str(arg) + b"\x85R"


CANARY = "touch /tmp/kiln-pwned-by-attack-file"
W = tensor_v2("0", 6, 0, [2, 3], [3, 1])
W_DATA = struct.pack("<6f", 1, 2, 3, 4, 5, 6)

# --------------------------------------------------------------------------- zip


def local_header(name, data, method=0, crc=None, usize=None):
    crc = zlib.crc32(data) if crc is None else crc
    usize = len(data) if usize is None else usize
    n = name.encode()
    return (
        struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0x0800, method, 0, 0, crc, len(data), usize, len(n), 0)
        + n
    )


def central_header(name, offset, crc, csize, usize, method=0):
    n = name.encode()
    return (
        struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            20,
            20,
            0x0800,
            method,
            0,
            0,
            crc,
            csize,
            usize,
            len(n),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        + n
    )


def eocd(count, cd_size, cd_offset):
    return struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, cd_offset, 0)


def zip_archive(entries):
    """entries: dicts with name, data and optional method, usize (real uncompressed size),
    cd_csize / cd_usize (what the central directory claims)."""
    out = b""
    central = b""
    for e in entries:
        data = e["data"]
        method = e.get("method", 0)
        usize = e.get("usize", len(data))
        crc = e.get("crc", zlib.crc32(data))
        offset = len(out)
        out += local_header(e["name"], data, method, crc, usize) + data
        central += central_header(
            e["name"], offset, crc, e.get("cd_csize", len(data)), e.get("cd_usize", usize), method
        )
    return out + central + eocd(len(entries), len(central), len(out))


def torch_entries(pkl, records, prefix="archive"):
    entries = [{"name": f"{prefix}/data.pkl", "data": pkl}, {"name": f"{prefix}/byteorder", "data": b"little"}]
    for k, data in records:
        entries.append({"name": f"{prefix}/data/{k}", "data": data})
    entries.append({"name": f"{prefix}/version", "data": b"3\n"})
    return entries


def torch_zip(pkl, records=(("0", W_DATA),)):
    return zip_archive(torch_entries(pkl, records))


# --------------------------------------------------------------------------- safetensors


def st_file(header, data):
    if isinstance(header, str):
        header = header.encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


# --------------------------------------------------------------------------- the files


def write(rel, data):
    path = os.path.join(HERE, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def make_pickles():
    # Code execution through non-allowlisted globals (GLOBAL opcode, protocol 2).
    write("pickle_os_system.pt", torch_zip(state_dict([("w", W), ("x", payload_call("os", "system", CANARY))])))
    write("pickle_posix_system.pt", torch_zip(state_dict([("x", payload_call("posix", "system", CANARY))])))
    write(
        "pickle_builtins_eval.pt",
        torch_zip(state_dict([("x", payload_call("builtins", "eval", f"__import__('os').system({CANARY!r})"))])),
    )
    popen = op_global("subprocess", "Popen") + op_tuple([op_str("touch"), op_str("/tmp/kiln-pwned-by-attack-file")]) + b"\x85R"
    write("pickle_subprocess_popen.pt", torch_zip(state_dict([("x", popen)])))

    # Protocol 4: STACK_GLOBAL with SHORT_BINUNICODE names, inside a FRAME.
    def short(s):
        return b"\x8c" + bytes([len(s)]) + s.encode()

    body = b"}" + short("w") + short("os") + short("system") + b"\x93" + short(CANARY) + b"\x85R" + b"s."
    write("pickle4_stack_global_os_system.pt", torch_zip(b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body))

    # REDUCE on a callable that is not a function of the allowlist.
    write(
        "pickle_reduce_getattr.pt",
        torch_zip(
            state_dict(
                [("x", op_global("builtins", "getattr") + op_global("collections", "OrderedDict") + op_str("fromkeys") + b"\x86R")]
            )
        ),
    )
    # REDUCE whose "callable" is not a global at all (a string).
    write("pickle_reduce_on_string.pt", torch_zip(state_dict([("x", op_str("os.system") + op_tuple([]) + b"R")])))

    # BUILD (setstate) on an object that is not a tensor, parameter or OrderedDict.
    build_state = b"}" + op_str("__class__") + op_str("os.system") + b"s"
    write("pickle_build_on_int.pt", torch_zip(state_dict([("x", op_int(7) + build_state + b"b")])))

    # 100,000 nested lists ([[[...]]]) and 100,000 nested tuples.
    n = 100_000
    write("pickle_deep_lists.pt", torch_zip(b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."))
    write("pickle_deep_tuples.pt", torch_zip(b"\x80\x02" + b"(" * n + b")" + b"t" * n + b"."))

    # BINGET of a memo slot never written, and LONG_BINGET far out of range.
    write("pickle_memo_get_missing.pt", torch_zip(state_dict([("w", W), ("x", b"h\x05")])))
    write("pickle_memo_long_get.pt", torch_zip(state_dict([("x", b"j" + struct.pack("<I", 0xFFFFFFFF))])))

    # A string that claims 4 GB: must not be allocated.
    write("pickle_huge_string.pt", torch_zip(b"\x80\x02}" + b"X" + struct.pack("<I", 0xFFFFFFF0) + b"abc"))
    # No STOP: the stream just ends.
    write("pickle_truncated.pt", torch_zip(state_dict([("w", W)])[:-10]))
    # An opcode that does not exist.
    write("pickle_unknown_opcode.pt", torch_zip(b"\x80\x02}\xff."))

    # Tensors whose storage reference is wrong.
    write("pickle_storage_missing.pt", torch_zip(state_dict([("w", tensor_v2("7", 6, 0, [2, 3], [3, 1]))])))
    write(
        "pickle_view_out_of_bounds.pt",
        torch_zip(state_dict([("w", tensor_v2("0", 6, 4, [2, 3], [3, 1]))])),
    )
    write(
        "pickle_stride_overflow.pt",
        torch_zip(state_dict([("w", tensor_v2("0", 6, 0, [2, 3], [2**62, 1]))])),
    )
    # numel in the persistent id disagrees with the record (6 floats claimed, 4 stored).
    write(
        "pickle_numel_mismatch.pt",
        torch_zip(state_dict([("w", W)]), records=[("0", W_DATA[:16])]),
    )


def make_zips():
    good = torch_entries(state_dict([("w", W)]), [("0", W_DATA)])

    write("zip_entry_dotdot.pt", zip_archive(good + [{"name": "../x", "data": b"x"}]))
    write("zip_entry_absolute.pt", zip_archive(good + [{"name": "/etc/x", "data": b"x"}]))

    # Two storages; data/1's central record points inside data/0's payload, where a
    # complete local header + payload hides. Each entry on its own is valid.
    inner_data = struct.pack("<6f", 9, 9, 9, 9, 9, 9)
    inner = local_header("archive/data/1", inner_data) + inner_data
    outer_data = W_DATA + inner
    pkl = state_dict([("w", tensor_v2("0", len(outer_data) // 4, 0, [2, 3], [3, 1])), ("v", tensor_v2("1", 6, 0, [2, 3], [3, 1]))])
    out = b""
    central = b""
    count = 0
    for name, data in [("archive/data.pkl", pkl), ("archive/byteorder", b"little"), ("archive/data/0", outer_data)]:
        off = len(out)
        out += local_header(name, data) + data
        central += central_header(name, off, zlib.crc32(data), len(data), len(data))
        count += 1
        if name == "archive/data/0":
            inner_off = off + 30 + len(name) + len(W_DATA)
            central += central_header("archive/data/1", inner_off, zlib.crc32(inner_data), len(inner_data), len(inner_data))
            count += 1
    off = len(out)
    out += local_header("archive/version", b"3\n") + b"3\n"
    central += central_header("archive/version", off, zlib.crc32(b"3\n"), 2, 2)
    count += 1
    write("zip_overlapping_entries.pt", out + central + eocd(count, len(central), len(out)))

    # The central directory claims data/0 is 28 bytes (still inside the file); the
    # local header and the data say 24.
    lying = [dict(e) for e in good]
    lying[2]["cd_csize"] = lying[2]["cd_usize"] = 28
    write("zip_cd_size_mismatch.pt", zip_archive(lying))
    # ... or 4 GB, far past the end of the file, local header agreeing.
    past = zip_archive(good)
    write("zip_cd_size_past_eof.pt", patch_cd_sizes(past, "archive/data/0", 0xFFFFFFF0))

    # data/0 deflated (honest sizes): torch's mmap loader would return garbage.
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = comp.compress(W_DATA) + comp.flush()
    d = [dict(e) for e in good]
    d[2].update(data=deflated, method=8, usize=len(W_DATA), crc=zlib.crc32(W_DATA))
    write("zip_deflated_storage.pt", zip_archive(d))

    # A zip bomb: 64 MiB of zeros deflated to ~64 KB, and a storage claiming all of it.
    big = 64 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = comp.compress(bytes(big)) + comp.flush()
    pkl = state_dict([("w", tensor_v2("0", big // 4, 0, [big // 4], [1]))])
    b = torch_entries(pkl, [("0", bomb)])
    b[2].update(method=8, usize=big, crc=zlib.crc32(bytes(big)))
    write("zip_bomb.pt", zip_archive(b))

    # No data.pkl at all.
    write("zip_no_data_pkl.pt", zip_archive([e for e in good if not e["name"].endswith("data.pkl")]))


def patch_cd_sizes(archive, name, size):
    """Sets the central directory's compressed and uncompressed sizes of `name`, and the
    local header's too."""
    buf = bytearray(archive)
    n = name.encode()
    i = buf.find(b"PK\x01\x02")
    while i != -1:
        nlen = struct.unpack_from("<H", buf, i + 28)[0]
        if bytes(buf[i + 46 : i + 46 + nlen]) == n:
            struct.pack_into("<II", buf, i + 20, size, size)
            loc = struct.unpack_from("<I", buf, i + 42)[0]
            struct.pack_into("<II", buf, loc + 18, size, size)
        i = buf.find(b"PK\x01\x02", i + 4)
    return bytes(buf)


def make_safetensors():
    f32x6 = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    write("st_header_len_past_eof.safetensors", struct.pack("<Q", 1000) + b'{"a":1}')
    write("st_header_too_large.safetensors", struct.pack("<Q", 200_000_000) + b"{" + b" " * 64)
    write(
        "st_overlapping_offsets.safetensors",
        st_file('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}', f32x6),
    )
    write(
        "st_gapped_offsets.safetensors",
        st_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}', f32x6),
    )
    write(
        "st_non_utf8_header.safetensors",
        st_file(b'{"\xff\xfe":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}}', f32x6),
    )
    write(
        "st_duplicate_names.safetensors",
        st_file('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"a":{"dtype":"F32","shape":[3],"data_offsets":[12,24]}}', f32x6),
    )
    write(
        "st_shape_overflow.safetensors",
        st_file('{"a":{"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,24]}}', f32x6),
    )
    write(
        "st_byte_length_mismatch.safetensors",
        st_file('{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]},"b":{"dtype":"U8","shape":[4],"data_offsets":[20,24]}}', f32x6),
    )
    write(
        "st_offsets_past_eof.safetensors",
        st_file('{"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[1000],"data_offsets":[24,4024]}}', f32x6),
    )
    write(
        "st_unknown_dtype.safetensors",
        st_file('{"a":{"dtype":"F33","shape":[6],"data_offsets":[0,24]}}', f32x6),
    )
    write("st_header_not_json.safetensors", st_file("{this is not json}", f32x6))
    write(
        "st_metadata_not_strings.safetensors",
        st_file('{"__metadata__":{"n":{"nested":1}},"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}}', f32x6),
    )


def make_truncated():
    # Truncated copies of real files (made with torch / safetensors; see ../fixtures).
    fixtures = os.path.join(HERE, "..", "fixtures", "torch")
    with open(os.path.join(fixtures, "views.pt"), "rb") as f:
        pt = f.read()
    write("truncated_zip.pt", pt[: len(pt) // 2])
    with open(os.path.join(fixtures, "st_shapes.safetensors"), "rb") as f:
        st = f.read()
    write("truncated.safetensors", st[:-9])
    write("empty_file.bin", b"")


def make_indexes():
    # A shard index whose weight_map leaves the folder (the target is a valid file).
    f32x6 = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    write("index_traversal/target.safetensors", st_file('{"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}}', f32x6))
    write(
        "index_traversal/model/model.safetensors.index.json",
        b'{"metadata": {"total_size": 24}, "weight_map": {"a": "../target.safetensors"}}\n',
    )
    write(
        "index_absolute/model.safetensors.index.json",
        b'{"metadata": {}, "weight_map": {"a": "/etc/passwd"}}\n',
    )
    write(
        "index_missing_shard/model.safetensors.index.json",
        b'{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}\n',
    )
    # The index maps "b" to a shard that holds only "a".
    write("index_wrong_shard/model-00001-of-00001.safetensors", st_file('{"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}}', f32x6))
    write(
        "index_wrong_shard/model.safetensors.index.json",
        b'{"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}}\n',
    )


def make_legacy():
    # A tar in the layout of torch's pre-1.6 tar format (sys_info, pickle, storages, tensors).
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [("sys_info", b"\x80\x02}."), ("pickle", b"\x80\x02}."), ("storages", b"\x80\x02K\x00."), ("tensors", b"\x80\x02K\x00.")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    write("legacy_tar.pt", buf.getvalue())

    try:
        import torch
    except ImportError:
        print("torch not importable: keeping legacy_raw_pickle.pt, torchscript.pt, unsupported_complex128.pt")
        return
    torch.manual_seed(0)
    legacy = os.path.join(HERE, "legacy_raw_pickle.pt")
    if not os.path.exists(legacy):  # the legacy format embeds random storage keys
        torch.save({"w": torch.ones(2, 3)}, legacy, _use_new_zipfile_serialization=False)
    torch.save({"w": torch.ones(2, dtype=torch.complex128)}, os.path.join(HERE, "unsupported_complex128.pt"))
    script = os.path.join(HERE, "torchscript.pt")
    if not os.path.exists(script):  # random initial weights, and not reproducible
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)


def main():
    make_pickles()
    make_zips()
    make_safetensors()
    make_truncated()
    make_indexes()
    make_legacy()
    print("attack files written to", HERE)


if __name__ == "__main__":
    main()
