"""Recipes, the loader hook (`load(..., quantize=...)`, recorded recipes), the quantize -> load round trip and
logits bounds per recipe on tiny random checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import save_tiny_llama

from pocketllama.llm import load_model
from pocketllama.quant import Int4Linear, Int8Embedding, Int8Linear, Recipe, parse_recipe, quantize_model
from pocketllama.quant.save import quantize_checkpoint

# Relative logits error ||q - f|| / ||f|| vs the float model, asserted per recipe (measured on these tiny
# random models: int8 0.019, g32 0.16-0.17, g64 0.18, g128 0.22, g256 0.24; about 2-2.7x the relative
# weight error, the noise of ~16 quantized matmuls stacked on each path).
LOGIT_BOUNDS = {"int8": 0.03, "int4-g32": 0.22, "int4-g64": 0.25, "int4-g128": 0.30, "int4-g256": 0.32}


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(path, seed=3, tie_word_embeddings=request.param, hidden_size=256, intermediate_size=512)
    return path


def _ids(vocab: int = 320) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
@pytest.mark.parametrize("recipe", list(LOGIT_BOUNDS))
def test_quantized_load_stays_within_the_recipe_bound(tiny, recipe):
    float_model, _ = load_model(tiny, dtype=torch.float32)
    model, _ = load_model(tiny, dtype=torch.float32, quantize=recipe)
    assert model.config.quantization == parse_recipe(recipe).to_dict()
    ids = _ids()
    ref, got = float_model(ids), model(ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < LOGIT_BOUNDS[recipe], rel
    w2 = e2 = 0.0
    state = float_model.state_dict()
    for name, m in model.named_modules():
        if hasattr(m, "dequantize"):
            w = state[f"{name}.weight"]
            e2, w2 = e2 + (m.dequantize() - w).square().sum().item(), w2 + w.square().sum().item()
    assert rel < 3.5 * math.sqrt(e2 / w2)


@torch.no_grad()
@pytest.mark.parametrize("recipe", ["int8", "int4-g32"])
def test_quantized_model_equals_float_model_with_dequantized_weights(tiny, recipe):
    """Every quantized module computes exactly what its dequantized float weight computes (fp32)."""
    model, _ = load_model(tiny, dtype=torch.float32, quantize=recipe)
    reference, _ = load_model(tiny, dtype=torch.float32)
    state = reference.state_dict()
    for name, m in model.named_modules():
        if hasattr(m, "dequantize"):
            state[f"{name}.weight"] = m.dequantize(torch.float32)
    reference.load_state_dict(state)
    ids = _ids()
    torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-5)


def test_modules_are_swapped_as_the_recipe_says(tiny):
    model, _ = load_model(tiny, dtype=torch.float32, quantize="int4-g32")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Int4Linear) and isinstance(layer.mlp.down_proj, Int4Linear)
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    if not model.config.tie_word_embeddings:
        assert isinstance(model.lm_head, Int8Linear)
    assert type(layer.input_layernorm).__name__ == "RMSNorm"


@torch.no_grad()
def test_quantize_then_load_round_trip(tiny, tmp_path):
    out = quantize_checkpoint(tiny, tmp_path / "q", "int4-g32")
    config = json.loads((out / "config.json").read_text())
    assert config["pocketllama_quantization"] == {"linear": "int4", "group_size": 32, "embedding": "int8",
                                                  "lm_head": "int8", "version": 1}
    loaded, _ = load_model(out, dtype=torch.float32)
    assert isinstance(loaded.model.layers[1].mlp.up_proj, Int4Linear)
    direct, _ = load_model(tiny, dtype=torch.float32)
    quantize_model(direct, "int4-g32")
    ids = _ids()
    torch.testing.assert_close(loaded(ids), direct(ids), rtol=0, atol=0)
    # quantize=False dequantizes the stored parts back into float modules
    dequantized, _ = load_model(out, dtype=torch.float32, quantize=False)
    assert type(dequantized.model.layers[1].mlp.up_proj).__name__ == "Linear"
    assert dequantized.config.quantization is None
    torch.testing.assert_close(dequantized(ids), loaded(ids), rtol=1e-5, atol=1e-5)


def test_a_quantized_checkpoint_is_not_requantized(tiny, tmp_path):
    out = quantize_checkpoint(tiny, tmp_path / "q", "int8")
    with pytest.raises(ValueError, match=r"is already quantized \(int8\); it cannot be re-quantized to int4-g32"):
        load_model(out, quantize="int4-g32")
    with pytest.raises(ValueError, match=r"is already quantized \(int8\); quantize the original float checkpoint"):
        quantize_checkpoint(out, tmp_path / "again", "int4-g32")
    model, _ = load_model(out, quantize="int8")  # asking for what is stored is fine
    assert model.config.quantization["linear"] == "int8"


def test_quantize_refuses_a_non_empty_output_folder(tiny, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not an empty folder; choose a new folder"):
        quantize_checkpoint(tiny, tmp_path / "x", "int8")


def test_groups_that_do_not_fit_keep_the_layer_in_float(tmp_path):
    save_tiny_llama(tmp_path, intermediate_size=160)  # down_proj rows of 160 values: no groups of 64
    model, _ = load_model(tmp_path, dtype=torch.float32, quantize="int4-g64")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear"
    assert isinstance(model.model.layers[0].mlp.up_proj, Int4Linear)


# ---- recipes --------------------------------------------------------------------------------------------


def test_named_recipes_and_dicts():
    assert parse_recipe("int4-g32") == Recipe(linear="int4", group_size=32, embedding="int8", lm_head="int8")
    assert parse_recipe("INT8").name == "int8"
    custom = parse_recipe('{"linear": "int4", "group_size": 128}')
    assert custom == Recipe(linear="int4", group_size=128) and custom.name.startswith("{")
    assert Recipe.from_dict(custom.to_dict()) == custom


@pytest.mark.parametrize("value,message", [
    ("int3", "unknown quantization recipe 'int3'; choose one of int8, int4-g32"),
    ({"linear": "int4"}, "recipe uses int4 but group_size is None; choose one of"),
    ({"linear": "int8", "group_size": 32}, "recipe group_size 32 applies to int4 only"),
    ({"linear": "fp8"}, "recipe field 'linear' is 'fp8'"),
    ({"linear": "int8", "mode": "x"}, r"unknown key\(s\) \['mode'\]"),
    ({"linear": "int8", "version": 9}, "quantization format version 9 is not supported"),
    ("{nope", "is not valid JSON"),
])
def test_bad_recipes_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        parse_recipe(value)


def test_tied_table_needs_one_setting(tmp_path):
    save_tiny_llama(tmp_path, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="ties its embedding and output .* embedding='int8' and lm_head=None"):
        load_model(tmp_path, quantize={"linear": "int8", "embedding": "int8"})


@torch.no_grad()
def test_vision_model_text_trunk_quantizes_by_recipe(tmp_path):
    """Llama 3.2 Vision: self- and cross-attention blocks, embedding and lm_head of `language_model` follow the
    recipe; the vision tower stays as stored; the recipe is recorded on the text config."""
    from mllama_fixtures import save_mllama

    save_mllama(tmp_path)
    float_model, _ = load_model(tmp_path, dtype=torch.float32)
    model, _ = load_model(tmp_path, dtype=torch.float32, quantize="int8")
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["language_model.model.embed_tokens"] == "Int8Embedding"
    assert kinds["language_model.lm_head"] == "Int8Linear"
    assert any(".cross_attn.q_proj" in n and k == "Int8Linear" for n, k in kinds.items())
    assert all(k != "Int8Linear" for n, k in kinds.items() if n.startswith("vision_model"))
    assert model.config.quantization["linear"] == "int8"
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    ref, got = float_model(ids), model(ids)
    assert ((got - ref).norm() / ref.norm()).item() < LOGIT_BOUNDS["int8"]
