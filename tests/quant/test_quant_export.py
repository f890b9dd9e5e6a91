"""export-gguf: the file passes the gguf reader with the expected tensors and keys (Llama 3 `llama-bpe`
vocabulary, chat template, rope_freqs, tied output), and loading it back reproduces the logits (F16 tight,
Q8_0 / Q4_0 exactly the format's rounding); llama.cpp's greedy tokens when llama-cpp-python is installed."""

from __future__ import annotations

import importlib.util
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from conftest import LLAMA3_ROPE_32, llama3_tokenizer_path, save_tiny_llama

from pocketllama.llm import load, load_model
from pocketllama.quant.gguf_export import export_gguf, tiktoken_merges
from pocketllama.quant.save import quantize_checkpoint

TEMPLATE = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"


@pytest.fixture(scope="module")
def llama3_tiny(tmp_path_factory):
    """A tiny Llama with the real Llama 3 vocabulary (128256), tokenizer.model and a chat template."""
    path = tmp_path_factory.mktemp("llama3")
    model = save_tiny_llama(path, seed=7, vocab_size=128256, bos_token_id=128000, eos_token_id=128009,
                            rope_scaling=dict(LLAMA3_ROPE_32, original_max_position_embeddings=8192))
    shutil.copy(llama3_tokenizer_path(), path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return path, model


@pytest.fixture(scope="module")
def exported(llama3_tiny, tmp_path_factory):
    path, _ = llama3_tiny
    out = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(path, out / f"tiny-{q}.gguf", q) for q in ("f16", "q8_0", "q4_0")}


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_exported_file_has_the_llama_keys_and_tensors(exported):
    reader = gguf.GGUFReader(exported["q4_0"])
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == 2 and _field(reader, "llama.embedding_length") == 64
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 128256 and tokens[128000] == "<|begin_of_text|>" and tokens[9906] == "Hello"
    assert _field(reader, "tokenizer.ggml.token_type")[128009] == 3  # control
    merges = _field(reader, "tokenizer.ggml.merges")
    assert len(merges) == 280147 and merges[0] == "Ġ Ġ"  # as Meta's tokenizer.json lists them
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 128000
    assert _field(reader, "tokenizer.ggml.eot_token_id") == 128009
    assert _field(reader, "tokenizer.chat_template") == TEMPLATE
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert {"token_embd.weight", "output_norm.weight", "rope_freqs.weight", "blk.1.ffn_down.weight"} <= set(names)
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_merges_match_the_tiktoken_ranks():
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(llama3_tokenizer_path()))
    merges = tiktoken_merges(ranks)
    assert all(a + b in ranks for a, b in merges[:1000])
    assert len({a + b for a, b in merges}) == len(ranks) - 256 - sum(1 for t in ranks if len(t) > 1 and not any(
        t[:i] in ranks and t[i:] in ranks for i in range(1, len(t))))


def _reference(model, qtype: str | None):
    """The transformers model with every matrix rounded the way the GGUF type stores it."""
    ref = type(model)(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:
                if qtype is None:
                    p.copy_(p.half().float())
                else:
                    t = gguf.GGMLQuantizationType[qtype]
                    deq = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), t), t)
                    p.copy_(torch.from_numpy(np.asarray(deq)).reshape(p.shape))
    return ref


@torch.no_grad()
@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
def test_round_trip_reproduces_the_logits(llama3_tiny, exported, qtype):
    _, model = llama3_tiny
    llm = load(exported[qtype], dtype=torch.float32)
    ids = torch.randint(0, 128256, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = _reference(model, None if qtype == "f16" else qtype.upper())
    torch.testing.assert_close(llm.model(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert llm.tokenizer.encode("Hello world") == [9906, 1917]
    assert llm.chat_template == TEMPLATE and 128009 in llm.tokenizer.stop_ids
    if qtype == "f16":  # and close to the fp32 original: fp16 rounding only
        exact = model(ids).logits
        assert ((llm.model(ids) - exact).norm() / exact.norm()).item() < 2e-3


@torch.no_grad()
def test_export_from_a_quantized_checkpoint_and_from_gguf(llama3_tiny, tmp_path):
    path, _ = llama3_tiny
    q = quantize_checkpoint(path, tmp_path / "q", "int8")
    out = export_gguf(q, tmp_path / "from-int8.gguf", "f16")
    quantized, _ = load_model(q, dtype=torch.float32)
    back, _ = load_model(out, dtype=torch.float32)
    ids = torch.randint(0, 128256, (1, 7), generator=torch.Generator().manual_seed(1))
    rel = ((back(ids) - quantized(ids)).norm() / quantized(ids).norm()).item()
    assert rel < 2e-3, rel  # the dequantized int8 weights, rounded to fp16
    again = export_gguf(out, tmp_path / "again.gguf", "f16")  # a GGUF source keeps its vocabulary keys
    assert gguf.GGUFReader(again).fields["tokenizer.ggml.pre"].contents() == "llama-bpe"


def test_export_errors_name_the_fix(llama3_tiny, tmp_path):
    path, _ = llama3_tiny
    with pytest.raises(ValueError, match="GGUF type 'q5_k' is not one pocketllama exports; choose one of"):
        export_gguf(path, tmp_path / "x.gguf", "q5_k")
    other = tmp_path / "other"
    save_tiny_llama(other)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.save(str(other / "tokenizer.json"))
    with pytest.raises(ValueError, match="for this tokenizer pass the llama.cpp pre-tokenizer name with --pre"):
        export_gguf(other, tmp_path / "y.gguf", "f16")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (optional peer): llama.cpp parity not checked")
def test_llama_cpp_greedy_tokens_match_pocketllama(llama3_tiny, exported):
    from llama_cpp import Llama

    llm = load(exported["f16"], dtype=torch.float32)
    prompt = llm.tokenizer.encode("Once upon a time", add_bos=True)
    ours = llm.generate(prompt, max_tokens=12, temperature=0).tokens
    peer = Llama(model_path=str(exported["f16"]), n_ctx=64, verbose=False, logits_all=False)
    theirs = []
    for token in peer.generate(prompt, temp=0.0, top_k=1):
        theirs.append(token)
        if len(theirs) == len(ours):
            break
    assert theirs == list(ours)
