"""HF checkpoint folders: `model.safetensors` or sharded `model.safetensors.index.json`, memory-mapped.

Each file is mapped once (private, copy-on-write); every tensor is copied (converting its dtype if asked)
into anonymous huge-page memory, which decode streams faster than file-backed pages, and the mapped pages
of that tensor are released right after, so RSS holds one copy of the model plus one tensor at most.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any

import torch

from .hugepages import empty_huge

_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One .safetensors file: header parsed by hand, data mapped once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{path} is not a safetensors file (only {len(raw)} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"{path} is not a valid safetensors file (header length {n} past the file end)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path} has a corrupt safetensors header: {e}") from None
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self.entries: dict[str, dict[str, Any]] = header
        for name, e in header.items():
            begin, end = e["data_offsets"]
            if e["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {e['dtype']}, which pocketllama cannot read")
            if not 0 <= begin <= end <= size - self._base:
                raise ValueError(f"{path} is truncated or corrupt: tensor {name!r} data ends past the file")

    def dtype(self, name: str) -> torch.dtype:
        return _ST_DTYPES[self.entries[name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def view(self, name: str) -> torch.Tensor:
        """The tensor as a read-only-by-convention view of the mapping (no copy; `_release` drops its pages)."""
        e = self.entries[name]
        begin, end = e["data_offsets"]
        src_dtype = _ST_DTYPES[e["dtype"]]
        if end == begin:
            return torch.empty(e["shape"], dtype=src_dtype)
        return torch.frombuffer(self._mm, dtype=src_dtype, count=(end - begin) // src_dtype.itemsize,
                                offset=self._base + begin).view(e["shape"])

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        begin, end = self.entries[name]["data_offsets"]
        t = self.view(name)
        src_dtype = t.dtype
        out = empty_huge(t.shape, dtype or src_dtype)  # anonymous, huge-page memory streams faster (hugepages.py)
        out.copy_(t)
        self._release(self._base + begin, self._base + end)
        return out

    def _release(self, begin: int, end: int) -> None:
        """Drop the mapped pages of a copied tensor so RSS holds only the copy."""
        page = mmap.PAGESIZE
        start = (begin + page - 1) // page * page
        stop = end // page * page
        if stop > start and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)


class SafetensorsCheckpoint:
    """An HF model folder (config.json + safetensors weights + tokenizer files)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder
        config = folder / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{folder} has no config.json; is it an HF model folder?")
        try:
            self._config = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config} is not valid JSON: {e}") from None
        index = folder / "model.safetensors.index.json"
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            for name, shard in weight_map.items():
                shard_path = folder / shard
                if not shard_path.is_file():
                    raise FileNotFoundError(f"{index} names shard {shard}, which is missing from {folder}")
                if shard not in self._files:
                    self._files[shard] = SafetensorsFile(shard_path)
                if name not in self._files[shard].entries:
                    raise ValueError(f"{index} maps {name!r} to {shard}, but that shard does not contain it")
                self._where[name] = self._files[shard]
        else:
            shards = sorted(folder.glob("*.safetensors"))
            if not shards:
                found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
                raise FileNotFoundError(f"{folder} has no model.safetensors (found: {found})")
            for shard in shards:
                f = self._files[shard.name] = SafetensorsFile(shard)
                for name in f.entries:
                    self._where[name] = f
        first = next(iter(self._where.values()), None)
        self.native_dtype = (_config_dtype(self._config) or
                             (first.dtype(next(iter(first.entries))) if first else torch.float32))

    def hf_config(self) -> dict[str, Any]:
        return dict(self._config)

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def load_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._where[name].get(name, dtype)

    def load_view(self, name: str) -> torch.Tensor:
        """The stored tensor without a copy, for a caller that converts it at once (quantization while
        loading) and then calls `release(name)`."""
        return self._where[name].view(name)

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Drop a tensor's mapped pages (or those of rows r0..r1 of its first dimension) from RSS once the
        caller holds its own copy (e.g. quantized buffers); views of it read the file again if touched."""
        f = self._where[name]
        begin, end = f.entries[name]["data_offsets"]
        if rows is not None:
            row_bytes = (end - begin) // max(1, f.shape(name)[0])
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        f._release(f._base + begin, f._base + end)

    def load_tokenizer(self):
        """tokenizer.json (HF), else a Llama 3 tiktoken `tokenizer.model` (also under `original/`, as in
        Meta's Hub repos)."""
        from ..tokenizer import Tokenizer

        if (self.path / "tokenizer.json").is_file():
            return Tokenizer.from_hf_dir(self.path)
        for candidate in (self.path / "tokenizer.model", self.path / "original" / "tokenizer.model"):
            if candidate.is_file():
                return Tokenizer.from_tiktoken(candidate)
        raise FileNotFoundError(f"{self.path} has no tokenizer.json or tokenizer.model")

    def generation_config(self) -> dict[str, Any]:
        p = self.path / "generation_config.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def chat_template(self) -> str | None:
        p = self.path / "tokenizer_config.json"
        tpl = json.loads(p.read_text()).get("chat_template") if p.is_file() else None
        jinja = self.path / "chat_template.jinja"
        if tpl is None and jinja.is_file():
            tpl = jinja.read_text()
        if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tpl}
            tpl = named.get("default") or next(iter(named.values()), None)
        return tpl


def _config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    name = config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("torch_dtype")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to one safetensors file (contiguous CPU copies, shared storage resolved)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path),
              metadata=metadata or {"format": "pt"})
