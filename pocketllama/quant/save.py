"""`quantize_checkpoint(src, out, recipe)`: write a quantized safetensors checkpoint one tensor at a time
(memory: the source's mapped pages plus one layer), with the recipe recorded in config.json.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .handler import plan_for_recipe, quantize_weight, with_quantization
from .recipe import Recipe, module_of, parse_recipe
from .views import part_shapes

_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
             torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")


def write_safetensors_streaming(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                                produce: Iterable[tuple[str, torch.Tensor]],
                                metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file whose tensors (names, dtypes, shapes declared up front in `entries`) come one
    at a time from `produce`, in the same order; each is checked against its declaration."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        expected = iter(entries)
        for name, t in produce:
            want = next(expected, None)
            if want is None or want[0] != name or t.dtype != want[1] or tuple(t.shape) != tuple(want[2]):
                raise RuntimeError(f"tensor {name} {t.dtype} {tuple(t.shape)} does not match the declared {want}")
            f.write(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        if next(expected, None) is not None:
            raise RuntimeError(f"{path}: fewer tensors were produced than declared")


def quantize_checkpoint(source: str | Path, out: str | Path, recipe: str | dict | Recipe,
                        dtype: str | torch.dtype | None = None,
                        progress: Callable[[str], None] | None = None) -> Path:
    """Quantize a float checkpoint (HF / Meta folder, GGUF) into an HF-style folder pocketllama loads back.

    Float tensors (norms, unquantized layers, scales and zeros) are stored in `dtype` (default: the source's
    native dtype). Writes model.safetensors, config.json (with `pocketllama_quantization`) and the tokenizer.
    """
    from ..config import TextConfig, parse_dtype
    from ..models import model_class
    from ..sources import resolve
    from ..weights import open_checkpoint
    from ..weights.base import build_on_meta
    from .handler import model_shapes

    recipe = parse_recipe(recipe)
    checkpoint = open_checkpoint(resolve(source))
    config = getattr(checkpoint, "config", None) or TextConfig.from_hf(checkpoint.hf_config())
    if config.quantization:
        raise ValueError(f"{checkpoint.path} is already quantized ({Recipe.from_dict(config.quantization).name}); "
                         "quantize the original float checkpoint instead")
    target = parse_dtype(dtype) or checkpoint.native_dtype
    if target not in (torch.float32, torch.bfloat16, torch.float16):
        target = torch.float32
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} exists and is not an empty folder; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)

    shapes = model_shapes(build_on_meta(model_class(config.model_type), config))
    plan = plan_for_recipe(recipe, shapes, config.tie_word_embeddings)
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for name, shape in shapes.items():
        module = module_of(name)
        if module in plan:
            for part, pshape in part_shapes(plan[module], shape).items():
                kind = {"weight": torch.int8 if plan[module].kind == "int8" else torch.uint8}.get(part, target)
                entries.append((f"{module}.{part}", kind, pshape))
        else:
            entries.append((name, target, shape))

    def produce():
        for name in shapes:
            module = module_of(name)
            if progress:
                progress(name)
            if module in plan:
                w = checkpoint.load_tensor(name)
                yield from ((f"{module}.{p}", t) for p, t in quantize_weight(w, plan[module], target).items())
                del w
            else:
                yield name, checkpoint.load_tensor(name, target)

    write_safetensors_streaming(out / "model.safetensors", entries, produce(),
                                {"format": "pt", "pocketllama_quantization": recipe.name})
    saved = with_quantization(config, recipe.to_dict(), torch_dtype=str(target).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(saved.to_hf(), indent=2) + "\n")
    copy_tokenizer(checkpoint, out)
    return out


def copy_tokenizer(checkpoint: Any, out: Path) -> None:
    """Tokenizer files next to the weights: copied from a folder source; written from a GGUF vocabulary."""
    src = Path(checkpoint.path)
    folder = src if src.is_dir() else None
    copied = False
    if folder is not None:
        for name in TOKENIZER_FILES:
            for candidate in (folder / name, folder / "original" / name):
                if candidate.is_file():
                    shutil.copyfile(candidate, out / name)
                    copied = True
                    break
    if copied:
        if not (out / "generation_config.json").is_file() and checkpoint.generation_config():
            (out / "generation_config.json").write_text(json.dumps(checkpoint.generation_config(), indent=2))
        return
    tok = checkpoint.load_tokenizer()
    backend = getattr(tok, "_backend", None)  # a GGUF vocabulary is a tokenizers.Tokenizer underneath
    if backend is None or not hasattr(backend, "tok"):
        raise ValueError(f"cannot write a tokenizer for {src}: no tokenizer files to copy")
    backend.tok.save(str(out / "tokenizer.json"))

    def name(i: int | None) -> str | None:
        return None if i is None else tok.id_to_token(i)

    tok_config = {"bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id),
                  "add_bos_token": tok.add_bos, "chat_template": checkpoint.chat_template() or tok.chat_template}
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in tok_config.items() if v is not None},
                                                          indent=2))
    gen = dict(checkpoint.generation_config())
    gen["eos_token_id"] = sorted(tok.stop_ids) if len(tok.stop_ids) > 1 else gen.get("eos_token_id")
    (out / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None},
                                                           indent=2))
