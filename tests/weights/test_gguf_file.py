"""The GGUF container parser (weights/gguf_file.py): every metadata type, and corrupt or hostile headers that
must fail fast, with bounded memory, naming the file and the defect."""

from __future__ import annotations

import struct

import gguf
import numpy as np
from gguf import GGUFValueType as VT
from weights.gguf_fixtures import (
    build_gguf,
    f32_tensor_bytes,
    fails_fast,
    gguf_string,
    llama_kvs,
    valid_gguf,
    write_bytes,
)

from pocketllama.weights.gguf import open_gguf
from pocketllama.weights.gguf_file import MAX_ARRAY_ITEMS, MAX_STRING_BYTES, parse_gguf


def test_metadata_value_types(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_int32("t.i32", -7)
    w.add_uint64("t.u64", 2**40)
    w.add_int64("t.i64", -(2**40))
    w.add_float32("t.f32", 1e-5)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.arr_f", [0.5, -1.0])
    w.add_array("t.arr_b", [True, False])
    w.add_array("t.arr_s", ["a", "", "ü"])
    w.add_key_value("t.nested", [[1, 2], [3]], VT.ARRAY, sub_type=VT.ARRAY)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    md = parse_gguf(tmp_path / "m.gguf").metadata
    assert {k: v for k, v in md.items() if k.startswith("t.")} == {
        "t.u8": 200, "t.i8": -100, "t.u16": 60000, "t.i16": -30000, "t.i32": -7, "t.u64": 2**40,
        "t.i64": -(2**40), "t.f32": 1e-5, "t.f64": 0.1, "t.bool": True, "t.str": "héllo",
        "t.arr_f": [0.5, -1.0], "t.arr_b": [True, False], "t.arr_s": ["a", "", "ü"], "t.nested": [[1, 2], [3]]}


def test_builder_makes_valid_files(tmp_path):
    _, path = valid_gguf(tmp_path)
    ckpt = open_gguf(path)
    assert ckpt.metadata["llama.block_count"] == 1
    assert np.array_equal(ckpt.load_tensor("model.layers.0.input_layernorm.weight").numpy(),
                          np.frombuffer(f32_tensor_bytes(64), np.float32))


def test_wrong_magic(tmp_path):
    fails_fast(write_bytes(tmp_path / "x.gguf", b"PK\x03\x04" + b"\0" * 100),
                r"x.gguf is not a GGUF file \(magic b'PK\\x03\\x04'\)")
    fails_fast(write_bytes(tmp_path / "e.gguf", b""), r"e.gguf is not a GGUF file \(magic b''\)")


def test_tensor_offset_past_the_end(tmp_path):
    data = build_gguf(llama_kvs(), [("blk.0.attn_norm.weight", [64], 0, 2**20)], data=f32_tensor_bytes(64))
    path = write_bytes(tmp_path / "far.gguf", data)
    fails_fast(path, rf"far.gguf is truncated: tensor 'blk.0.attn_norm.weight' needs bytes up to "
                      rf"{len(data) + 2**20} but the file has {len(data)}")


def test_tensor_data_offset_overflow_and_misalignment(tmp_path):
    path = write_bytes(tmp_path / "huge.gguf", build_gguf(llama_kvs(), [("w", [64], 0, 2**64 - 32)]))
    fails_fast(path, r"huge.gguf is truncated: tensor 'w' needs bytes up to \d+ but the file has \d+")
    path = write_bytes(tmp_path / "mis.gguf", build_gguf(llama_kvs(), [("w", [64], 0, 3)], data=b"\0" * 300))
    fails_fast(path, r"mis.gguf is corrupt: tensor 'w' data offset 3 is not a multiple of the alignment 32")
    path = write_bytes(tmp_path / "dims.gguf", build_gguf(llama_kvs(), [("w", [2**40, 2**40], 0, 0)]))
    fails_fast(path, r"dims.gguf is corrupt: tensor 'w' claims \d+ elements")


def test_metadata_string_longer_than_the_file(tmp_path):
    raw = gguf_string("general.name") + struct.pack("<I", VT.STRING) + struct.pack("<Q", 2**62) + b"abc"
    path = write_bytes(tmp_path / "s.gguf", build_gguf(llama_kvs(), raw_kv=raw))
    fails_fast(path, r"s.gguf is truncated or corrupt: metadata key 'general.name' has a string length of 4611686018427387904 "
                      r"bytes at offset \d+, past the end of the file \(\d+ bytes\)")
    key = struct.pack("<Q", 10**12) + b"general"
    path = write_bytes(tmp_path / "k.gguf", build_gguf(llama_kvs(), raw_kv=key))
    fails_fast(path, r"k.gguf is truncated or corrupt: metadata key #7 has a string length of 1000000000000 bytes")


def test_array_longer_than_the_file(tmp_path):
    raw = gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", VT.ARRAY, VT.STRING, 2**61)
    path = write_bytes(tmp_path / "a.gguf", build_gguf(llama_kvs(), raw_kv=raw + b"\0" * 64))
    fails_fast(path, r"a.gguf is corrupt: metadata key 'tokenizer.ggml.tokens' claims 2305843009213693952 array "
                      r"items of at least 8 bytes")
    raw = gguf_string("x") + struct.pack("<IIQ", VT.ARRAY, VT.FLOAT32, 2**40)
    path = write_bytes(tmp_path / "f.gguf", build_gguf(llama_kvs(), raw_kv=raw))
    fails_fast(path, r"f.gguf is corrupt: metadata key 'x' claims 1099511627776 array items of at least 4 bytes")
    raw = gguf_string("nest") + struct.pack("<IIQ", VT.ARRAY, VT.ARRAY, 1) + struct.pack("<IQ", VT.ARRAY, 1) * 6
    path = write_bytes(tmp_path / "n.gguf", build_gguf(llama_kvs(), raw_kv=raw + b"\0" * 64))
    fails_fast(path, r"n.gguf is corrupt: metadata key 'nest'(\[0\])+ nests arrays more than 4 deep")


def test_absurd_counts(tmp_path):
    path = write_bytes(tmp_path / "t.gguf", build_gguf(llama_kvs(), n_tensors=2**60))
    fails_fast(path, r"t.gguf is truncated or corrupt: header claims 1152921504606846976 tensors, but a file of \d+ bytes can "
                      r"hold at most \d+")
    path = write_bytes(tmp_path / "kv.gguf", build_gguf(llama_kvs(), n_kv=2**63))
    fails_fast(path, r"kv.gguf is truncated or corrupt: header claims 9223372036854775808 metadata entries")


def test_bad_version_types_and_duplicates(tmp_path):
    fails_fast(write_bytes(tmp_path / "v1.gguf", build_gguf(llama_kvs(), version=1)),
                r"v1.gguf has GGUF version 1; pocketllama reads versions 2 and 3")
    fails_fast(write_bytes(tmp_path / "be.gguf", build_gguf(llama_kvs(), version=3 << 24)),
                r"be.gguf is a big-endian GGUF file")
    fails_fast(write_bytes(tmp_path / "vt.gguf", build_gguf(llama_kvs(), raw_kv=gguf_string("x") + b"\x63\0\0\0")),
                r"vt.gguf is corrupt: metadata key 'x' has unknown value type 99")
    dup = llama_kvs() + [("general.architecture", VT.STRING, "llama")]
    fails_fast(write_bytes(tmp_path / "d.gguf", build_gguf(dup)),
                r"d.gguf is corrupt: metadata key 'general.architecture' appears twice")
    two = [("w", [64], 0, 0), ("w", [64], 0, 256)]
    fails_fast(write_bytes(tmp_path / "d2.gguf", build_gguf(llama_kvs(), two, data=b"\0" * 512)),
                r"d2.gguf is corrupt: tensor 'w' appears twice")
    fails_fast(write_bytes(tmp_path / "ty.gguf", build_gguf(llama_kvs(), [("w", [64], 999, 0)], data=b"\0" * 256)),
                r"ty.gguf is corrupt or too new: tensor 'w' has unknown ggml type id 999; known types: F32, F16")
    fails_fast(write_bytes(tmp_path / "blk.gguf", build_gguf(llama_kvs(), [("w", [33], 8, 0)], data=b"\0" * 64)),
                r"blk.gguf is corrupt: tensor 'w' \(Q8_0\) has a row of 33 values, not a multiple of the block size")
    align = llama_kvs() + [("general.alignment", VT.UINT32, 24)]
    fails_fast(write_bytes(tmp_path / "al.gguf", build_gguf(align)),
                r"al.gguf is corrupt: general.alignment must be a power-of-two uint32, got 24")
    fails_fast(write_bytes(tmp_path / "nd.gguf", build_gguf(llama_kvs(), [("w", [1, 1, 1, 1, 1], 0, 0)])),
                r"nd.gguf is corrupt: tensor 'w' has 5 dimensions \(GGUF allows 1..4\)")


def _sparse(path, head: bytes, size: int):
    """A file of `size` bytes (sparse: no disk, no memory) that starts with `head`."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def test_limits_hold_even_when_the_file_is_big_enough(tmp_path):
    """A lying length that fits in a big file is still refused before it costs memory."""
    n = MAX_ARRAY_ITEMS + 1
    raw = gguf_string("x") + struct.pack("<IIQ", VT.ARRAY, VT.UINT8, n)
    path = _sparse(tmp_path / "arr.gguf", build_gguf(llama_kvs(), raw_kv=raw), n + 4096)
    fails_fast(path, rf"arr.gguf is corrupt: metadata key 'x' claims {n} array items, over the limit of "
                     rf"{MAX_ARRAY_ITEMS}")
    n = MAX_STRING_BYTES + 1
    raw = gguf_string("general.name") + struct.pack("<IQ", VT.STRING, n)
    path = _sparse(tmp_path / "str.gguf", build_gguf(llama_kvs(), raw_kv=raw), n + 4096)
    fails_fast(path, rf"str.gguf is corrupt: metadata key 'general.name' has a string length of {n} bytes, over "
                     r"the 64 MiB limit")


def test_invalid_utf8_is_named(tmp_path):
    raw = gguf_string("general.name") + struct.pack("<I", VT.STRING) + gguf_string(b"ok\xff")
    fails_fast(write_bytes(tmp_path / "u.gguf", build_gguf(llama_kvs(), raw_kv=raw)),
               r"u.gguf is corrupt: metadata key 'general.name' is not valid UTF-8 \(invalid start byte at byte 2\)")
    raw = gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", VT.ARRAY, VT.STRING, 2)
    raw += gguf_string("a") + gguf_string(b"\xc3")
    fails_fast(write_bytes(tmp_path / "t.gguf", build_gguf(llama_kvs(), raw_kv=raw)),
               r"t.gguf is corrupt: metadata key 'tokenizer.ggml.tokens'\[1\] is not valid UTF-8")
