"""Memory planner: estimates from metadata match the bytes a load really holds, the release-table shapes give
the expected weight sizes, and `load` refuses what will not fit with a recipe or context that would."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import save_tiny_llama

from pocketllama.config import TextConfig
from pocketllama.llm import load_model
from pocketllama.models.llama import LlamaForCausalLM
from pocketllama.quant import memory
from pocketllama.weights import open_checkpoint
from pocketllama.weights.base import build_on_meta

LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                   max_position_embeddings=131072)


def _estimate(config: TextConfig, quantize, dtype=torch.bfloat16, context=4096):
    model = build_on_meta(LlamaForCausalLM, config)
    return memory.estimate(model, SimpleNamespace(path=Path("llama-3.2-1b")), quantize=quantize, dtype=dtype,
                           context=context)


def test_llama_1b_weight_bytes_per_recipe():
    """1.236B parameters: bf16 2.47 GB (the release table says 2.5), int8 1.24 GB (1.25), int4-g32 with int8
    embeddings 0.87 GB (Meta's own scheme; the table's 0.75 GB needs 4-bit embeddings too)."""
    cfg = TextConfig(**LLAMA_32_1B)
    bf16 = _estimate(cfg, None)
    assert bf16.weights == {"bf16": 2 * 1_235_814_400}
    int8 = _estimate(cfg, "int8")
    assert 1.23e9 < int8.weight_bytes < 1.25e9 and set(int8.weights) == {"int8", "bf16"}
    int4 = _estimate(cfg, "int4-g32")
    block = 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192)  # q,o + k,v + mlp: 973M weights
    assert int4.weights["int4-g32"] == block // 2 + block // 32 * 4  # 4 bits + bf16 scale and zero per 32
    assert 0.86e9 < int4.weight_bytes < 0.88e9
    assert bf16.kv_cache == 2 * 16 * 8 * 4096 * 64 * 2  # 134 MB for 4k tokens
    assert "weights int4-g32" in int4.table() and "KV cache" in int4.table()


def test_llama_1b_int4_table_recipes_fit_the_release_figure():
    """The release table's 0.75 GB for a 4-bit 1B needs the tied 128256 x 2048 table in int4 too: int4-g64-e4
    stores 0.695 GB. At group 32 the scales and zeros (bf16, 1 byte per 8 weights) keep int4-g32-e4 at 0.772 GB."""
    cfg = TextConfig(**LLAMA_32_1B)
    block = 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192)  # q,o + k,v + mlp
    table = 128256 * 2048  # tied: one table, no lm_head
    norms = (2 * 16 + 1) * 2048 * 2  # bf16
    for group in (32, 64):
        est = _estimate(cfg, f"int4-g{group}-e4")
        int4 = (block + table) // 2 + (block + table) // group * 4  # 4 bits + bf16 scale and zero per group
        assert est.weights == {f"int4-g{group}": int4, "bf16": norms}
    assert _estimate(cfg, "int4-g64-e4").weight_bytes <= 0.75e9 < _estimate(cfg, "int4-g32-e4").weight_bytes
    assert 0.69e9 < _estimate(cfg, "int4-g64-e4").weight_bytes
    assert _estimate(cfg, "int4-g32").weight_bytes - _estimate(cfg, "int4-g32-e4").weight_bytes == (
        table + 128256 * 2) - (table // 2 + table // 32 * 4)  # int8 + a bf16 scale per row -> int4 g32


def test_llama_1b_g32_linears_with_a_g128_table_fit_the_release_figure():
    """int4-g32-e4g128 keeps the g32 block linears of Meta's scheme and stores the tied table in int4 groups of
    128 (a bf16 scale and zero per 128 values): 0.748 GB, at the release table's 0.75 GB."""
    cfg = TextConfig(**LLAMA_32_1B)
    block = 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192)  # q,o + k,v + mlp
    table = 128256 * 2048  # tied: one table, no lm_head
    norms = (2 * 16 + 1) * 2048 * 2  # bf16
    est = _estimate(cfg, "int4-g32-e4g128")
    assert est.weights == {"int4-g32": block // 2 + block // 32 * 4, "int4-g128": table // 2 + table // 128 * 4,
                           "bf16": norms}
    assert est.weight_bytes == 747_851_776 <= 0.75e9
    assert est.weight_bytes < _estimate(cfg, "int4-g32-e4").weight_bytes - 24_000_000  # 3/4 of the table's scales


def test_estimate_matches_the_bytes_a_load_holds(tmp_path):
    save_tiny_llama(tmp_path, hidden_size=128, intermediate_size=256)
    for recipe, dtype in ((None, torch.float32), ("int8", torch.float32), ("int4-g32", torch.bfloat16),
                          ("int4-g32-e4", torch.bfloat16), ("int4-g32-e4g128", torch.bfloat16)):
        model, ckpt = load_model(tmp_path, dtype=dtype, quantize=recipe)
        held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
                   if t is not None) - sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                                           if "rotary" in n)
        meta = build_on_meta(LlamaForCausalLM, TextConfig.from_hf(ckpt.hf_config()))
        est = memory.estimate(meta, ckpt, quantize=recipe, dtype=dtype, context=64)
        assert est.weight_bytes == held, recipe


def test_check_fits_suggests_a_recipe_and_a_context(tmp_path):
    save_tiny_llama(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    big = TextConfig(**{**LLAMA_32_1B, "max_position_embeddings": 131072})
    model = build_on_meta(LlamaForCausalLM, big)
    f = memory.estimate(model, ckpt, dtype=torch.bfloat16, context=4096)
    q = memory.estimate(model, ckpt, quantize="int4-g32", dtype=torch.bfloat16, context=4096)
    with pytest.raises(memory.NotEnoughMemoryError, match=r"Try quantize='int8' \(CLI: --quantize int8"):
        memory.check_fits(model, ckpt, dtype=torch.bfloat16, context=4096, available=(f.total + q.total) // 2)
    long = memory.estimate(model, ckpt, quantize="int4-g32", dtype=torch.bfloat16, context=65536)
    with pytest.raises(memory.NotEnoughMemoryError,  # the int4 table saves the rest; or a shorter context
                       match=r"Try quantize='int4-g32-e4g128' \(CLI: --quantize int4-g32-e4g128; ~.*\) or "
                             r"context=32768 \(~"):
        memory.check_fits(model, ckpt, quantize="int4-g32", dtype=torch.bfloat16, context=65536,
                          available=long.total - 1)
    g128 = memory.estimate(model, ckpt, quantize="int4-g32-e4g128", dtype=torch.bfloat16, context=65536)
    with pytest.raises(memory.NotEnoughMemoryError,  # g32 linears with a g128 table do not fit: g64 ones do
                       match=r"Try quantize='int4-g64-e4' \(CLI: --quantize int4-g64-e4; ~.*\) or context=32768"):
        memory.check_fits(model, ckpt, quantize="int4-g32", dtype=torch.bfloat16, context=65536,
                          available=g128.total - 1)
    with pytest.raises(memory.NotEnoughMemoryError, match="a smaller model; nothing pocketllama can change fits"):
        memory.check_fits(model, ckpt, dtype=torch.bfloat16, available=10**6)
    assert memory.check_fits(model, ckpt, dtype=torch.bfloat16, available=f.total).total == f.total


def test_load_refuses_what_does_not_fit(tmp_path, monkeypatch):
    save_tiny_llama(tmp_path)
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**8)
    with pytest.raises(MemoryError, match=r"not enough memory to load .* but only 0.10 GB is available \(MemAvailable\)"):
        load_model(tmp_path)
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**11)
    load_model(tmp_path)


def test_available_bytes_reads_meminfo():
    value = memory.available_bytes()
    assert value is None or value > 10**7


def test_vision_model_plan_counts_the_encoder_and_the_cross_attention_cache(tmp_path):
    """`pocketllama memory` on Llama 3.2 Vision: every weight (vision tower included) as a load holds it, and
    the cross-attention K/V of one image (all tiles) beside the text KV cache."""
    from mllama_fixtures import save_mllama

    save_mllama(tmp_path, hidden_size=64, intermediate_size=128)
    for recipe, dtype in ((None, torch.float32), ("int4-g32", torch.bfloat16)):
        model, _ = load_model(tmp_path, dtype=dtype, quantize=recipe)
        held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
                   if t is not None) - sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                                           if "rotary" in n)
        est = memory.plan_memory(tmp_path, recipe=recipe or "none", dtype=dtype, context=64)
        assert est.weight_bytes == held, recipe
        c = model.config
        e = torch.tensor([], dtype=dtype).element_size()
        want = (2 * len(c.cross_attention_layers) * c.text.num_key_value_heads * c.vision.max_num_tiles
                * c.vision.num_patches * c.text.head_dim * e)
        assert est.cross_cache == want > 0
        assert "cross-attn cache" in est.table() and est.total > est.weight_bytes + est.kv_cache + est.cross_cache
