"""`pocketllama models`: model aliases and the models found in the local HF cache, with sizes."""

from __future__ import annotations

import argparse

from .common import cli_errors


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


@cli_errors
def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="pocketllama models", description=__doc__).parse_args(argv)
    from ..sources import ALIASES, DEFAULT_MODEL, ModelNotFoundError, cached_models, hf_cache_dir, resolve

    print("aliases:")
    for alias in ALIASES.values():
        try:
            path = resolve(alias.name)
            where = f"{path} ({_size(_disk_size(path))})"
        except ModelNotFoundError:
            where = "not available here"
        mark = " (default)" if alias.name == DEFAULT_MODEL else ""
        print(f"  {alias.name}{mark}: {alias.description}\n      -> {where}")
    models = cached_models()
    print(f"\nHF cache {hf_cache_dir()}: {len(models)} model(s)")
    for repo_id, snap, size in models:
        print(f"  {repo_id}  {_size(size)}  {snap}")
    return 0


def _disk_size(path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
