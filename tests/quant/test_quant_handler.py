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
from pocketllama.quant.modules import Int4Embedding
from pocketllama.quant.save import quantize_checkpoint

# Relative logits error ||q - f|| / ||f|| vs the float model, asserted per recipe (measured on these tiny
# random models: int8 0.019, g32 0.16-0.17, g64 0.18, g128 0.22, g256 0.24; about 2-2.7x the relative
# weight error, the noise of ~16 quantized matmuls stacked on each path). With an int4 token table (and tied
# output): g32-e4 0.206 tied / 0.216 untied, g64-e4 0.218 / 0.214.
LOGIT_BOUNDS = {"int8": 0.03, "int4-g32": 0.22, "int4-g64": 0.25, "int4-g128": 0.30, "int4-g256": 0.32,
                "int4-g32-e4": 0.26, "int4-g64-e4": 0.27}


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
@pytest.mark.parametrize("recipe", ["int8", "int4-g32", "int4-g32-e4"])
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


def test_int4_table_recipe_swaps_the_table_and_the_output(tiny):
    model, _ = load_model(tiny, dtype=torch.float32, quantize="int4-g32-e4")
    table = model.model.embed_tokens
    assert isinstance(table, Int4Embedding) and table.group_size == 32
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    if model.config.tie_word_embeddings:  # one table: lookups and logits (attend)
        assert not hasattr(model, "lm_head") or model.lm_head is None
    else:
        assert isinstance(model.lm_head, Int4Linear) and model.lm_head.group_size == 32


@torch.no_grad()
def test_int4_table_quantize_then_load_round_trip(tiny, tmp_path):
    from safetensors import safe_open

    out = quantize_checkpoint(tiny, tmp_path / "q", "int4-g32-e4")
    config = json.loads((out / "config.json").read_text())
    assert config["pocketllama_quantization"] == {"linear": "int4", "group_size": 32, "embedding": "int4",
                                                  "lm_head": "int4", "version": 1}
    with safe_open(out / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.embed_tokens.weight")
        assert w.dtype == torch.uint8 and tuple(w.shape) == (320, 128)  # (V, D/2): two values a byte
        assert tuple(f.get_tensor("model.embed_tokens.zeros").shape) == (320, 8)
    loaded, _ = load_model(out, dtype=torch.float32)
    assert isinstance(loaded.model.embed_tokens, Int4Embedding)
    assert loaded.config.quantization == parse_recipe("int4-g32-e4").to_dict()
    direct, _ = load_model(tiny, dtype=torch.float32)
    quantize_model(direct, "int4-g32-e4")
    ids = _ids()
    torch.testing.assert_close(loaded(ids), direct(ids), rtol=0, atol=0)
    dequantized, _ = load_model(out, dtype=torch.float32, quantize=False)
    assert type(dequantized.model.embed_tokens).__name__ == "Embedding"
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
    assert parse_recipe("int4-g64-e4") == Recipe(linear="int4", group_size=64, embedding="int4", lm_head="int4")
    assert Recipe.from_dict(parse_recipe("int4-g32-e4").to_dict()).name == "int4-g32-e4"
    custom = parse_recipe('{"linear": "int4", "group_size": 128}')
    assert custom == Recipe(linear="int4", group_size=128) and custom.name.startswith("{")
    assert Recipe.from_dict(custom.to_dict()) == custom


@pytest.mark.parametrize("value,message", [
    ("int3", "unknown quantization recipe 'int3'; choose one of int8, int4-g32"),
    ({"linear": "int4"}, "recipe uses int4 but group_size is None; choose one of"),
    ({"linear": "int8", "group_size": 32}, "recipe group_size 32 applies to int4 only"),
    ({"linear": "int8", "embedding": "int4", "lm_head": "int4"}, "recipe uses int4 but group_size is None"),
    ({"embedding": "fp8"}, r"recipe field 'embedding' is 'fp8'; choose one of \('int8', 'int4'\)"),
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
    mixed = {"linear": "int4", "group_size": 32, "embedding": "int4", "lm_head": "int8"}
    with pytest.raises(ValueError, match="ties its embedding and output .* embedding='int4' and lm_head='int8'; "
                                         "set both to the same value .*'int4-g32-e4' has an int4 table"):
        load_model(tmp_path, quantize=mixed)
    with pytest.raises(ValueError, match="embedding='int4' and lm_head='int8'"):
        quantize_checkpoint(tmp_path, tmp_path / "q", mixed)


def test_untied_model_may_mix_an_int4_table_with_an_int8_output(tmp_path):
    save_tiny_llama(tmp_path, tie_word_embeddings=False)
    model, _ = load_model(tmp_path, dtype=torch.float32,
                          quantize={"linear": "int4", "group_size": 32, "embedding": "int4", "lm_head": "int8"})
    assert isinstance(model.model.embed_tokens, Int4Embedding) and isinstance(model.lm_head, Int8Linear)


def test_an_int4_table_whose_rows_do_not_split_into_groups_stays_float(tmp_path):
    save_tiny_llama(tmp_path, hidden_size=64, intermediate_size=128)  # rows of 64 values: no groups of 128
    model, _ = load_model(tmp_path, dtype=torch.float32, quantize="int4-g128-e4")
    assert type(model.model.embed_tokens).__name__ == "Embedding"
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)  # 128 input values: one group


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


@torch.no_grad()
def test_vision_model_text_trunk_takes_an_int4_table(tmp_path):
    """Llama 3.2 Vision looks its (vocab + 8)-row table up (no tied output): an Int4Embedding; logits stay
    within 0.43 of the float model's (measured 0.33 here; int4-g32 with its int8 table: 0.28)."""
    from mllama_fixtures import save_mllama

    save_mllama(tmp_path)
    float_model, _ = load_model(tmp_path, dtype=torch.float32)
    model, _ = load_model(tmp_path, dtype=torch.float32, quantize="int4-g32-e4")
    assert isinstance(model.language_model.model.embed_tokens, Int4Embedding)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = float_model(ids)
    assert ((model(ids) - ref).norm() / ref.norm()).item() < 0.43


def test_quantize_weight_reports_every_row_chunk_once(monkeypatch):
    """A memory-mapped source drops each chunk's pages as soon as it is quantized: the reported row ranges
    tile the weight exactly, and chunking does not change the result."""
    from pocketllama.quant import handler
    from pocketllama.quant.recipe import QSpec

    w = torch.randn(1000, 64)
    whole = handler.quantize_weight(w, QSpec("int4", 32), torch.float32)
    monkeypatch.setattr(handler, "QUANTIZE_CHUNK_VALUES", 64 * 300)  # 300 rows per chunk
    seen: list[tuple[int, int]] = []
    chunked = handler.quantize_weight(w, QSpec("int4", 32), torch.float32, rows_done=lambda a, b: seen.append((a, b)))
    assert seen == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


@torch.no_grad()
def test_vision_recipe_suffix_quantizes_the_encoder_linears_int8(tmp_path):
    """`<recipe>-v8`: Llama 3.2 Vision's encoder linears (local and global layers) and projector become
    Int8Linear; its embeddings, norms and patch conv stay float; the name and config.json record it;
    image logits stay within 0.05 of the `int4-g32` model without it (int8 per row is small next to int4)."""
    import numpy as np
    from mllama_fixtures import IMAGE, TILE, save_mllama
    from PIL import Image

    from pocketllama.image_processing import MllamaImageProcessor
    from pocketllama.quant import parse_recipe

    save_mllama(tmp_path)
    plain, _ = load_model(tmp_path, dtype=torch.float32, quantize="int4-g32")
    model, _ = load_model(tmp_path, dtype=torch.float32, quantize="int4-g32-v8")
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    vision = {n: k for n, k in kinds.items() if n.startswith("vision_model") and n.endswith(("_proj", "fc1", "fc2"))}
    assert vision and all(k == "Int8Linear" for k in vision.values())
    assert any("global_transformer" in n for n in vision) and kinds["multi_modal_projector"] == "Int8Linear"
    assert kinds["vision_model.patch_embedding"] != "Int8Linear"
    assert model.config.quantization["vision"] == "int8" and "vision" not in plain.config.quantization
    assert parse_recipe("int4-g32-v8").name == "int4-g32-v8" and parse_recipe("int4-g32").vision is None
    with pytest.raises(ValueError, match="recipe field 'vision' is 'int4'"):
        parse_recipe({"linear": "int8", "embedding": "int8", "lm_head": "int8", "vision": "int4"})
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    images = MllamaImageProcessor(tile_size=TILE)([[picture]])
    rows = [[1, *range(10, 14), IMAGE, *range(20, 34)]]
    ref = plain(torch.tensor(rows), vision=plain.encode_images(images, rows))
    got = model(torch.tensor(rows), vision=model.encode_images(images, rows))
    err = ((got - ref).norm() / ref.norm()).item()  # measured 0.0054: the image does reach the logits
    assert 0 < err < 0.05
