"""Shared command flags (commands/common.py): --quantize and --int8-activations reach `load`."""

from __future__ import annotations

import argparse

import pytest

from pocketllama.commands import common


def _load_kwargs(monkeypatch, argv: list[str]) -> dict:
    """The keyword arguments `load_from_args` passes to `load` for these command-line flags."""
    seen = {}
    monkeypatch.setattr("pocketllama.llm.load", lambda model, **kw: seen.update(kw) or "llm")
    p = argparse.ArgumentParser()
    common.add_model_args(p)
    common.add_speculation_args(p)
    assert common.load_from_args(p.parse_args(["-m", "x", *argv])) == "llm"
    return seen


@pytest.mark.parametrize("flag,expected", [(None, None), ("none", False), ("NONE", False), ("int8", "int8"),
                                           ("int4-g32", "int4-g32")])
def test_quantize_flag_reaches_load(monkeypatch, flag, expected):
    seen = _load_kwargs(monkeypatch, [] if flag is None else ["--quantize", flag])
    assert seen["quantize"] is expected if not isinstance(expected, str) else seen["quantize"] == expected


@pytest.mark.parametrize("argv,expected", [([], None), (["--int8-activations"], True)])
def test_int8_activations_flag_reaches_load(monkeypatch, argv, expected):
    assert _load_kwargs(monkeypatch, argv).get("int8_activations") is expected
