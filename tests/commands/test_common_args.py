"""Shared command flags (commands/common.py): --quantize and --int8-activations reach `load`."""

from __future__ import annotations

import argparse

import pytest

from pocketllama.commands import common


@pytest.mark.parametrize("flag,expected", [(None, None), ("none", False), ("NONE", False), ("int8", "int8"),
                                           ("int4-g32", "int4-g32")])
def test_quantize_flag_reaches_load(monkeypatch, flag, expected):
    seen = {}
    monkeypatch.setattr("pocketllama.llm.load", lambda model, **kw: seen.update(kw) or "llm")
    p = argparse.ArgumentParser()
    common.add_model_args(p)
    common.add_speculation_args(p)
    args = p.parse_args(["-m", "x"] + ([] if flag is None else ["--quantize", flag]))
    assert common.load_from_args(args) == "llm"
    assert seen["quantize"] is expected if not isinstance(expected, str) else seen["quantize"] == expected


@pytest.mark.parametrize("argv,expected", [([], None), (["--int8-activations"], True)])
def test_int8_activations_flag_reaches_load(monkeypatch, argv, expected):
    seen = {}
    monkeypatch.setattr("pocketllama.llm.load", lambda model, **kw: seen.update(kw) or "llm")
    p = argparse.ArgumentParser()
    common.add_model_args(p)
    common.add_speculation_args(p)
    assert common.load_from_args(p.parse_args(["-m", "x", *argv])) == "llm"
    assert seen.get("int8_activations") is expected
