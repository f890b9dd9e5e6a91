"""finetune/merge.py and the `merge`, `finetune` and `chat --adapter` commands: a merged checkpoint equals base +
adapter (in pocketllama and transformers), quantized bases re-quantize with a check, CLI defaults = library's."""

from __future__ import annotations

import json

import pytest
import torch
from ft_fixtures import one_thread, save_tiny_llama3  # noqa: F401

from pocketllama.finetune.lora import apply_lora, lora_modules
from pocketllama.finetune.merge import merge_adapter
from pocketllama.finetune.peft_format import load_adapter, save_adapter
from pocketllama.llm import load_model

IDS = torch.tensor([[128000, 791, 4320, 14198, 39935, 35308, 927, 279, 16053]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    save_tiny_llama3(root / "base")
    return root


def make_adapter(base_dir, folder, scale: float, seed: int = 0):
    model, _ = load_model(base_dir, dtype="float32")
    apply_lora(model, "all-linear", r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * scale)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * scale)
        adapted = model(IDS)
    save_adapter(model, folder, base_model=str(base_dir))
    return adapted


def test_merged_checkpoint_equals_base_plus_adapter(base, tmp_path):
    from transformers import LlamaForCausalLM

    adapted = make_adapter(base / "base", tmp_path / "adapter", scale=0.3)
    report = merge_adapter(base / "base", tmp_path / "adapter", tmp_path / "merged")
    assert report.recipe is None and report.merge_error < 1e-5 and report.adapter_effect > 0.01
    merged, _ = load_model(tmp_path / "merged", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), adapted, atol=2e-5, rtol=1e-5)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, adapted, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.model").is_file()


def test_quantized_base_is_merged_through_float_and_requantized(base, tmp_path):
    from pocketllama.quant.modules import Int8Linear
    from pocketllama.quant.save import quantize_checkpoint

    quantize_checkpoint(base / "base", tmp_path / "int8", "int8")
    make_adapter(base / "base", tmp_path / "adapter", scale=0.3)
    report = merge_adapter(tmp_path / "int8", tmp_path / "adapter", tmp_path / "merged")
    assert report.recipe == "int8" and report.retention > 0.9
    assert report.top1_agreement > 0.8
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["pocketllama_quantization"]["linear"] == "int8"
    merged, _ = load_model(tmp_path / "merged")
    assert isinstance(merged.model.layers[0].self_attn.q_proj, Int8Linear)
    # the adapter survived: the merged model is closer to float base + adapter than to the base
    float_adapted, _ = load_model(base / "base", dtype="float32")
    load_adapter(float_adapted, tmp_path / "adapter")
    plain, _ = load_model(base / "base", dtype="float32")
    with torch.no_grad():
        got, want, before = merged(IDS), float_adapted(IDS), plain(IDS)
    assert (got - want).norm() < 0.5 * (before - want).norm()


def test_requantization_that_loses_the_adapter_is_refused(base, tmp_path):
    from pocketllama.quant.save import quantize_checkpoint

    quantize_checkpoint(base / "base", tmp_path / "int4", "int4-g32")
    make_adapter(base / "base", tmp_path / "tiny", scale=0.02)  # an update far below int4 rounding
    with pytest.raises(ValueError, match="re-quantized to int4-g32, the merged model keeps only .*% of the "
                                         "adapter's change .* the adapter would be largely lost"):
        merge_adapter(tmp_path / "int4", tmp_path / "tiny", tmp_path / "lost")
    report = merge_adapter(tmp_path / "int4", tmp_path / "tiny", tmp_path / "float", quantize="none")
    assert report.recipe is None and "pocketllama_quantization" not in json.loads(
        (tmp_path / "float" / "config.json").read_text())
    with pytest.raises(FileExistsError, match="exists and is not an empty folder"):
        merge_adapter(tmp_path / "int4", tmp_path / "tiny", tmp_path / "float")


def test_merge_and_chat_adapter_commands(base, tmp_path, capsys):
    from pocketllama.commands import chat, merge

    make_adapter(base / "base", tmp_path / "adapter", scale=0.3)
    assert merge.main([str(base / "base"), str(tmp_path / "adapter"), "-o", str(tmp_path / "m")]) == 0
    assert "merged into" in capsys.readouterr().out
    flags = ["--max-tokens", "6", "--temperature", "0", "--date", "26 Jul 2024", "Hello there"]
    assert chat.main(["-m", str(base / "base"), "--adapter", str(tmp_path / "adapter"), *flags]) == 0
    unmerged = capsys.readouterr().out
    assert chat.main(["-m", str(tmp_path / "m"), *flags]) == 0
    assert capsys.readouterr().out == unmerged
    assert chat.main(["-m", str(base / "base"), *flags]) == 0
    assert capsys.readouterr().out != unmerged  # the adapter changed the answer
    assert merge.main([str(base / "base"), str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err


def test_finetune_cli_defaults_are_the_library_defaults(capsys):
    from pocketllama.commands import finetune as cmd
    from pocketllama.finetune.trainer import FinetuneConfig

    parser = cmd.build_parser()
    got = cmd.config_from_args(parser.parse_args(["--data", "d.jsonl", "-o", "out"]))
    assert got == FinetuneConfig(data="d.jsonl", output="out")
    assert all(a.help for a in parser._actions)  # --help explains every knob
    with pytest.raises(SystemExit):
        cmd.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--method", "--packing", "--lora-layers", "--grad-accum", "--resume", "--gradient-checkpointing",
                 "--bad-lines", "--too-long", "--schedule", "torchrun"):
        assert flag in text
    assert cmd.main(["--data", "d.jsonl", "-o", "out", "--lora-layers", "1,x"]) == 2
    assert "--lora-layers '1,x' must be a comma list of layer numbers" in capsys.readouterr().err


def test_serve_adapter_flag(base, tmp_path, monkeypatch, capsys):
    """`serve --adapter` applies the adapter to the loaded model before the engine starts (as chat does)."""
    import pocketllama
    from pocketllama.commands import serve

    llm = pocketllama.load(base / "base", dtype="float32")
    monkeypatch.setattr(serve, "load_from_args", lambda args: llm)
    assert serve.main(["--port", "0", "--adapter", str(tmp_path / "missing")]) == 2
    assert "missing has no adapter_config.json" in capsys.readouterr().err
    make_adapter(base / "base", tmp_path / "adapter", scale=0.3)
    started = {}

    def fake_app(llm, engine, **kwargs):  # stop before uvicorn: the model is what the engine will serve
        started["model"] = engine.model
        raise KeyboardInterrupt

    monkeypatch.setattr("pocketllama.server.create_app", fake_app)
    assert serve.main(["--port", "0", "--adapter", str(tmp_path / "adapter")]) == 130
    assert len(lora_modules(started["model"])) == 14 and not started["model"].training
