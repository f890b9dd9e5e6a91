"""Weight sources: HF safetensors folders, Meta original folders, GGUF files. One entry point: `open_checkpoint`."""

from __future__ import annotations

from pathlib import Path

from .base import Checkpoint


def open_checkpoint(path: Path) -> Checkpoint:
    """Pick the reader for a resolved local path (see `sources.resolve`)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".gguf" or _magic(path) == b"GGUF":
            from .gguf import open_gguf

            return open_gguf(path)
        raise ValueError(f"{path} is not a model pocketllama can read: expected a .gguf file or a model folder")
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        from .meta import MetaCheckpoint

        return MetaCheckpoint(path)
    if (path / "config.json").is_file():
        from .safetensors import SafetensorsCheckpoint

        return SafetensorsCheckpoint(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        from .gguf import open_gguf

        return open_gguf(ggufs[0])
    found = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "an empty folder"
    raise FileNotFoundError(
        f"{path} is not a model folder: expected config.json + *.safetensors (HF), params.json + "
        f"consolidated.*.pth (Meta) or one .gguf file; found {found}")


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)
