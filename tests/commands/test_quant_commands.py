"""`pocketllama quantize`, `export-gguf`, `memory` and `perplexity` through the CLI dispatcher: outputs,
and every bad input as one clear line with exit status 2."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import llama3_tokenizer_path, save_tiny_llama

from pocketllama.cli import main as cli_main
from pocketllama.llm import load_model
from pocketllama.quant import Int8Linear
from pocketllama.weights.gguf import open_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_tiny")
    save_tiny_llama(path, vocab_size=128256, bos_token_id=128000, eos_token_id=128001)
    shutil.copy(llama3_tokenizer_path(), path / "tokenizer.model")
    return path


def test_quantize_writes_a_loadable_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli_main(["quantize", str(tiny), "-o", str(out), "--recipe", "int8"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["pocketllama_quantization"]["linear"] == "int8"
    model, _ = load_model(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear)


def test_export_gguf_writes_the_requested_type(tiny, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert cli_main(["export-gguf", str(tiny), "-o", str(out), "--type", "Q8_0"]) == 0
    assert "Q8_0" in capsys.readouterr().err
    assert open_gguf(out).tensor_type("model.layers.0.mlp.up_proj.weight").name == "Q8_0"
    assert cli_main(["export-gguf", str(tiny), "-o", str(out)]) == 2
    assert f"{out} exists; choose a new file name" in capsys.readouterr().err


def test_memory_prints_the_breakdown_from_metadata(tiny, capsys):
    assert cli_main(["memory", str(tiny), "--context", "512", "--recipe", "int4-g32"]) == 0
    out = capsys.readouterr().out
    for line in ("weights int8", "weights total", "KV cache", "512 tokens", "activations", "runtime", "total",
                 "quantized while loading (int4-g32)", "available now"):
        assert line in out, line
    assert cli_main(["memory", str(tiny)]) == 0
    assert "weights fp32" in capsys.readouterr().out  # save_tiny_llama writes float32


def test_perplexity_json(tiny, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    argv = ["perplexity", str(tiny), "--file", str(text), "--window", "16", "--max-tokens", "30"]
    assert cli_main(argv + ["--quantize", "int8", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    # a random model: about as unsure as a uniform guess over its 128k-token vocabulary
    assert r["tokens"] == 29 and 1e4 < r["perplexity"] < 1e6 and r["quantization"]["linear"] == "int8"
    assert cli_main(argv) == 0
    assert "perplexity " in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["quantize", "{tiny}", "-o", "{tmp}/x", "--recipe", "int5"], "unknown quantization recipe 'int5'"),
    (["memory", "{tiny}", "--batch", "0"], "--batch must be >= 1, got 0"),
    (["memory", "{tmp}/missing"], "not found"),
    (["perplexity", "{tiny}", "--file", "{tmp}/none.txt"], "No such file or directory"),
    (["perplexity", "{tiny}", "--file", "{tiny}/config.json", "--window", "1"], "window must be at least 2 tokens"),
])
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, argv, message):
    assert cli_main([a.format(tiny=tiny, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_export_type_is_an_argparse_error(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["export-gguf", str(tiny), "-o", str(tmp_path / "x.gguf"), "--type", "q4_k"])
    assert exit_.value.code == 2 and "invalid choice: 'q4_k'" in capsys.readouterr().err


def test_quantize_does_not_overwrite(tiny, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    assert cli_main(["quantize", str(tiny), "-o", str(tmp_path / "busy")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
