"""Bounded, validating parser for the GGUF container (header, metadata, tensor table) over a read-only mmap.

Every count and length is checked against the bytes that are actually left before anything is allocated,
so a corrupt or hostile header fails fast with a ValueError instead of a huge allocation or a long loop.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 4
MAX_ARRAY_ITEMS = 1 << 24  # 16M: vocabularies hold ~256k tokens; caps the Python list a lying count can cost
MAX_STRING_BYTES = 1 << 26  # 64 MiB: chat templates are kilobytes
DEFAULT_ALIGNMENT = 32
_HEADER_BYTES = 24  # magic(4) + version(4) + tensor_count(8) + kv_count(8)
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value (u8/i8/bool)
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset

_SCALARS: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_STRUCT = {t: struct.Struct("<" + c) for t, c in zip(_SCALARS, "BbHhIifBQqd", strict=True)}  # standard sizes
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. `dims` is GGUF order (dims[0] = ne0, the innermost, contiguous axis)."""

    name: str
    ggml_type: GGMLQuantizationType
    dims: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Torch/numpy order: reversed GGUF dims, e.g. a [in=576, out=1536] GGUF matrix is (1536, 576)."""
        return tuple(reversed(self.dims))


@dataclass
class GGUFFile:
    """A parsed GGUF file: metadata as plain Python values, the tensor table, and the mmap holding the data."""

    path: Path
    version: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]  # file order
    buffer: mmap.mmap

    def tensor_bytes(self, info: TensorInfo) -> np.ndarray:
        """Zero-copy uint8 view of a tensor's raw bytes (read-only)."""
        return np.frombuffer(self.buffer, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def read_tensor_bytes(self, info: TensorInfo) -> np.ndarray:
        """A private copy of a tensor's raw bytes, read with the file API (no page of the mapping becomes
        resident: a caller converting blocks holds only this buffer and its result, whatever the kernel's
        page-cache folio sizes make a mapped read cost)."""
        out = np.empty(info.nbytes, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(info.offset)
            view, done = memoryview(out), 0
            while done < info.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{self.path} is truncated: tensor {info.name!r} ends past the file")
                done += n
        return out


class _Cursor:
    """Reads little-endian GGUF values from a buffer, checking every read against the file size."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path) -> None:
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def corrupt(self, what: str) -> ValueError:
        return ValueError(f"{self.path} is corrupt: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise ValueError(
                f"{self.path} is truncated: {what} needs {n} bytes at offset {self.pos} "
                f"but the file has {self.size} bytes"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(what)
        if n > self.size - self.pos:
            raise ValueError(
                f"{self.path} is truncated or corrupt: {what} has a string length of {n} bytes at offset {self.pos - 8}, "
                f"past the end of the file ({self.size} bytes)"
            )
        if n > MAX_STRING_BYTES:
            raise self.corrupt(f"{what} has a string length of {n} bytes, over the {MAX_STRING_BYTES >> 20} MiB limit")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.corrupt(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.corrupt(f"{what} has unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what, depth)
        dt = _SCALARS[vtype]
        self.need(dt.itemsize, what)
        (v,) = _STRUCT[vtype].unpack_from(self.buf, self.pos)
        self.pos += dt.itemsize
        if vtype == GGUFValueType.BOOL:
            return bool(v)
        if vtype == GGUFValueType.FLOAT32:
            return float(str(np.float32(v)))  # shortest decimal of the f32 (1e-05, not 9.999999747378752e-06)
        return v

    def array(self, what: str, depth: int) -> list[Any]:
        if depth >= MAX_ARRAY_NESTING:
            raise self.corrupt(f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep")
        etype = self.value_type(f"{what} (array element type)")
        n = self.u64(f"{what} (array length)")
        min_item = _SCALARS[etype].itemsize if etype in _SCALARS else (8 if etype == GGUFValueType.STRING else 12)
        if n > (self.size - self.pos) // min_item:
            raise ValueError(
                f"{self.path} is corrupt: {what} claims {n} array items of at least {min_item} bytes at offset "
                f"{self.pos}, more than the file ({self.size} bytes) holds"
            )
        if n > MAX_ARRAY_ITEMS:
            raise self.corrupt(f"{what} claims {n} array items, over the limit of {MAX_ARRAY_ITEMS}")
        if etype in _SCALARS:  # numeric arrays: one vectorized read
            dt = _SCALARS[etype]
            arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
            self.pos += n * dt.itemsize
            return arr.astype(bool).tolist() if etype == GGUFValueType.BOOL else arr.tolist()
        if etype == GGUFValueType.STRING:
            return self._strings(n, what)
        return [self.array(f"{what}[{i}]", depth + 1) for i in range(n)]

    def _strings(self, n: int, what: str) -> list[str]:
        # Hot loop (49k-128k tokens and merges): locals only, no per-item method calls.
        buf, size, pos, unpack = self.buf, self.size, self.pos, _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(n):
                if pos + 8 > size:
                    self.pos = pos
                    self.need(8, f"{what}[{len(out)}]")  # raises
                (ln,) = unpack(buf, pos)
                pos += 8
                if ln > size - pos:
                    raise ValueError(
                        f"{self.path} is truncated or corrupt: {what}[{len(out)}] has a string length of {ln} bytes at "
                        f"offset {pos - 8}, past the end of the file ({size} bytes)"
                    )
                if ln > MAX_STRING_BYTES:
                    raise self.corrupt(f"{what}[{len(out)}] has a string length of {ln} bytes, over the limit")
                append(buf[pos : pos + ln].decode("utf-8"))
                pos += ln
        except UnicodeDecodeError as e:
            raise self.corrupt(f"{what}[{len(out)}] is not valid UTF-8 ({e.reason})") from None
        self.pos = pos
        return out


def _ggml_type(raw: int, name: str, path: Path) -> GGMLQuantizationType:
    try:
        t = GGMLQuantizationType(raw)
    except ValueError:
        t = None
    if t is None or t not in GGML_QUANT_SIZES:
        known = ", ".join(q.name for q in GGMLQuantizationType if q in GGML_QUANT_SIZES)
        raise ValueError(
            f"{path} is corrupt or too new: tensor '{name}' has unknown ggml type id {raw}; known types: {known}"
        )
    return t


def parse_gguf(path: str | Path) -> GGUFFile:
    """Memory-map and validate a GGUF file; raise ValueError naming the file and the defect."""
    path = Path(path)
    size = path.stat().st_size
    if size < _HEADER_BYTES:
        with open(path, "rb") as f:
            head = f.read(4)
        if len(head) < 4 or head != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (magic {head!r})")
        raise ValueError(f"{path} is truncated: a GGUF header needs {_HEADER_BYTES} bytes but the file has {size}")
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(buf, size, path)
    except BaseException:
        try:
            buf.close()
        except BufferError:  # a numpy view is still alive in the traceback; the GC unmaps it later
            pass
        raise


def _parse(buf: mmap.mmap, size: int, path: Path) -> GGUFFile:
    magic = buf[:4]
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (magic {magic!r})")
    cur = _Cursor(buf, size, path)
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            raise ValueError(f"{path} is a big-endian GGUF file; pocketllama reads little-endian GGUF only")
        raise ValueError(f"{path} has GGUF version {version}; pocketllama reads versions 2 and 3")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    left = size - cur.pos
    if n_kv > left // _MIN_KV_BYTES:
        raise ValueError(f"{path} is truncated or corrupt: header claims {n_kv} metadata entries, but a file of "
                         f"{size} bytes can hold at most {left // _MIN_KV_BYTES}")
    if n_tensors > left // _MIN_TENSOR_INFO_BYTES or n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > left:
        raise ValueError(f"{path} is truncated or corrupt: header claims {n_tensors} tensors, but a file of {size} "
                         f"bytes can hold at most {max(0, left - n_kv * _MIN_KV_BYTES) // _MIN_TENSOR_INFO_BYTES}")

    metadata: dict[str, Any] = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        what = f"metadata key '{key}'"
        vtype = cur.value_type(what)
        if key in metadata:
            raise cur.corrupt(f"metadata key '{key}' appears twice")
        metadata[key] = cur.value(vtype, what)
        if key == "general.alignment":
            alignment = metadata[key]
            if vtype != GGUFValueType.UINT32 or alignment <= 0 or alignment & (alignment - 1):
                raise cur.corrupt(f"general.alignment must be a power-of-two uint32, got {alignment!r}")

    infos: list[tuple[str, GGMLQuantizationType, tuple[int, ...], int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        if name in seen:
            raise cur.corrupt(f"tensor '{name}' appears twice")
        seen.add(name)
        n_dims = cur.u32(f"tensor '{name}' dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.corrupt(f"tensor '{name}' has {n_dims} dimensions (GGUF allows 1..{MAX_DIMS})")
        dims = tuple(cur.u64(f"tensor '{name}' dims") for _ in range(n_dims))
        gtype = _ggml_type(cur.u32(f"tensor '{name}' type"), name, path)
        rel = cur.u64(f"tensor '{name}' offset")
        n_el = 1
        for d in dims:
            n_el *= d
        block, type_size = GGML_QUANT_SIZES[gtype]
        if dims[0] % block:
            raise cur.corrupt(f"tensor '{name}' ({gtype.name}) has a row of {dims[0]} values, "
                              f"not a multiple of the block size {block}")
        if n_el >= 2**62:
            raise cur.corrupt(f"tensor '{name}' claims {n_el} elements (dims {list(dims)})")
        if rel % alignment:
            raise cur.corrupt(f"tensor '{name}' data offset {rel} is not a multiple of the alignment {alignment}")
        infos.append((name, gtype, dims, rel, n_el // block * type_size))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, gtype, dims, rel, nbytes in infos:
        end = data_offset + rel + nbytes
        if end > size:
            raise ValueError(
                f"{path} is truncated: tensor '{name}' needs bytes up to {end} but the file has {size}"
            )
        tensors[name] = TensorInfo(name, gtype, dims, data_offset + rel, nbytes)
    return GGUFFile(path, version, alignment, data_offset, metadata, tensors, buf)
