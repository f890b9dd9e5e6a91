"""GGUF: write/read round trips on tiny random llamas, logits parity with transformers, the real SmolLM2 Q4_1
file, and every corrupt-input error (fast, bounded memory)."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest
import torch
from conftest import LLAMA3_ROPE_32, smollm2_gguf_path, tiny_llama_config
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from weights.gguf_fixtures import (
    build_gguf,
    f32_tensor_bytes,
    fails_fast,
    llama_kvs,
    quant_error_bound,
    tiny_tokenizer_meta,
    valid_gguf,
    write_bytes,
)

from pocketllama.config import TextConfig
from pocketllama.weights.gguf import (
    llama3_rope_divisors,
    open_gguf,
    permute_qk,
    recover_llama3_rope_scaling,
    unpermute_qk,
)
from pocketllama.weights.gguf_write import write_gguf

QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]
LLAMA3_DEFAULT_ROPE = {**LLAMA3_ROPE_32, "original_max_position_embeddings": 8192}
UNTIED = {"tie_word_embeddings": False, "rope_scaling": LLAMA3_DEFAULT_ROPE, "max_position_embeddings": 131072}


def _tiny_model(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    with torch.no_grad():  # random norms: a norm loaded into the wrong slot shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def tiny_models():
    """(tied, untied) transformers models; the untied one uses Llama 3's default llama3 rope parameters."""
    return {True: _tiny_model(0), False: _tiny_model(1, **UNTIED)}


@pytest.fixture(scope="module")
def tiny_files(tiny_models, tmp_path_factory):
    """{(qtype, tied): path} for every qtype, written once per module."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for tied, model in tiny_models.items():
        meta = tiny_tokenizer_meta(model.config.vocab_size)
        for q in QTYPES:
            out[q, tied] = write_gguf(root / f"tiny-{q}-{'tied' if tied else 'untied'}.gguf",
                                      model.config.to_dict(), model.state_dict(), meta, q)
    return out


def float_model_from_gguf(ckpt):
    """Our LlamaForCausalLM with every weight from `ckpt.load_tensor(name, float32)` (the dequantizing path;
    `pocketllama.load` may keep Q8_0/Q4_x blocks quantized instead, which the quant tests cover)."""
    from pocketllama.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM(TextConfig.from_hf(ckpt.hf_config())).eval()
    model.load_state_dict({n: ckpt.load_tensor(n, torch.float32) for n in ckpt.tensor_names()}, strict=True)
    return model


def _hf_state(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {k: v for k, v in sd.items() if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}


# ---- round trips -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("qtype", QTYPES)
def test_every_tensor_round_trips(tiny_models, tiny_files, qtype, tied):
    model, ckpt = tiny_models[tied], open_gguf(tiny_files[qtype, tied])
    src = _hf_state(model)
    assert sorted(ckpt.tensor_names()) == sorted(src)
    for name, w in src.items():
        got = ckpt.load_tensor(name, torch.float32)
        assert got.shape == w.shape == ckpt.tensor_shape(name), name
        if w.dim() == 1 or qtype == "F32":  # norms stay F32 like llama.cpp
            assert torch.equal(got, w), name
        elif qtype in ("F16", "BF16"):
            assert torch.equal(got, w.to({"F16": torch.float16, "BF16": torch.bfloat16}[qtype]).float()), name
        else:
            err = (got - w).abs()
            bound = quant_error_bound(w, qtype)
            assert (err <= bound).all(), f"{name}: max err {err.max():.3g} exceeds the {qtype} bound"
            assert err.max() > 0  # really quantized


@pytest.mark.parametrize(("qtype", "native"), [("F32", torch.float32), ("F16", torch.float16),
                                               ("BF16", torch.bfloat16), ("Q8_0", torch.float32)])
def test_native_dtype_follows_the_matrices(tiny_files, qtype, native):
    ckpt = open_gguf(tiny_files[qtype, True])
    assert ckpt.native_dtype == native
    assert ckpt.load_tensor("model.layers.0.mlp.up_proj.weight").dtype == native
    assert ckpt.hf_config()["torch_dtype"] == str(native).removeprefix("torch.")


@pytest.mark.parametrize("tied", [True, False])
def test_config_round_trips(tiny_models, tiny_files, tied):
    model, ckpt = tiny_models[tied], open_gguf(tiny_files["Q8_0", tied])
    cfg = ckpt.hf_config()
    hf = model.config
    rope = dict(hf.rope_parameters)
    rope.pop("rope_theta")
    assert cfg["rope_scaling"] == rope  # recovered from rope_freqs.weight
    assert cfg["rope_theta"] == 500000.0
    assert cfg["tie_word_embeddings"] is tied
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
                "eos_token_id"):
        assert cfg[key] == getattr(hf, key), key
    assert cfg["model_type"] == "llama" and cfg["attention_bias"] is False
    ours = TextConfig.from_hf(cfg)
    theirs = TextConfig.from_hf(hf.to_dict())
    assert ours == TextConfig(**{**theirs.__dict__, "torch_dtype": "float32"})
    assert "rope_freqs.weight" not in ckpt.tensor_names()
    assert ckpt.generation_config() == {"bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id}


def test_writer_follows_llama_cpp_and_reader_agrees_with_gguf_reader(tiny_models, tiny_files):
    """gguf's own GGUFReader sees the same metadata and offsets, and llama.cpp's permutation of q/k."""
    path = tiny_files["F32", False]
    ckpt, reader = open_gguf(path), gguf.GGUFReader(path)
    assert {t.name: t.data_offset for t in reader.tensors} == {n: i.offset for n, i in ckpt._file.tensors.items()}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        mine = ckpt.metadata[key]
        if isinstance(value, float):
            assert mine == pytest.approx(value, rel=1e-7), key
        else:
            assert mine == value, key
    sd = tiny_models[False].state_dict()
    q = {t.name: t.data for t in reader.tensors}["blk.0.attn_q.weight"]
    assert np.array_equal(q, permute_qk(sd["model.layers.0.self_attn.q_proj.weight"].numpy(), 4))
    k = {t.name: t.data for t in reader.tensors}["blk.1.attn_k.weight"]
    assert np.array_equal(k, permute_qk(sd["model.layers.1.self_attn.k_proj.weight"].numpy(), 2))
    assert any(t.name == "output.weight" for t in reader.tensors)
    tied_reader = gguf.GGUFReader(tiny_files["F32", True])
    assert not any(t.name == "output.weight" for t in tied_reader.tensors)
    assert [t.tensor_type for t in tied_reader.tensors if t.name.endswith("norm.weight")] == [QT.F32] * 5


def test_transformers_reads_our_file_like_llama_cpp_files(tiny_models, tiny_files):
    """transformers' GGUF loader (reverse-permutes q/k as for llama.cpp files) recovers the HF weights."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = tiny_models[False]
    tensors = load_gguf_checkpoint(str(tiny_files["F32", False]), return_tensors=True, model_to_load=model)["tensors"]
    for name, w in model.state_dict().items():
        assert torch.equal(tensors[name], w), name


def test_permutation_matches_spec():
    """SPEC 1.5: within a head, HF row p*(hd/2)+i is GGUF (Meta) row 2i+p; unpermute inverts permute."""
    n_head, hd, cols = 3, 8, 5
    hf = np.arange(n_head * hd * cols).reshape(n_head * hd, cols)
    g = permute_qk(hf, n_head)
    for h in range(n_head):
        for p in range(2):
            for i in range(hd // 2):
                assert np.array_equal(hf[h * hd + p * (hd // 2) + i], g[h * hd + 2 * i + p])
    assert np.array_equal(unpermute_qk(g, n_head), hf)
    assert np.array_equal(unpermute_qk(permute_qk(hf[:, 0], n_head), n_head), hf[:, 0])  # biases too
    with pytest.raises(ValueError, match="cannot un-permute 10 rows from 3 heads"):
        unpermute_qk(np.zeros((10, 2)), 3)


def test_raw_tensor_keeps_blocks(tiny_files):
    ckpt = open_gguf(tiny_files["Q8_0", True])
    name = "model.layers.0.self_attn.q_proj.weight"
    raw = ckpt.raw_tensor(name)
    assert raw.ggml_type == QT.Q8_0 and raw.shape == (64, 64) and raw.block_size == 32 and raw.type_size == 34
    assert raw.data.dtype == np.uint8 and raw.data.shape == (64, 2 * 34) and not raw.data.flags.writeable
    hf_rows = ckpt.raw_tensor(name, hf_row_order=True)
    deq = gguf.quants.dequantize(hf_rows.data, QT.Q8_0)
    assert torch.equal(torch.from_numpy(deq), ckpt.load_tensor(name))  # row reorder of blocks == un-permute
    assert np.array_equal(gguf.quants.dequantize(raw.data, QT.Q8_0), permute_qk(deq, 4))
    v = ckpt.raw_tensor("model.layers.0.self_attn.v_proj.weight", hf_row_order=True)
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(v.data, QT.Q8_0)),
                       ckpt.load_tensor("model.layers.0.self_attn.v_proj.weight"))


# ---- llama3 rope_freqs -----------------------------------------------------------------------------------


def test_llama3_divisors_match_spec_table():
    d64 = llama3_rope_divisors(500000.0, 64, 32.0, 1.0, 4.0, 8192)
    assert list(np.round(d64[15:18], 4)) == [1.6513, 3.2923, 9.6667]
    assert (d64[:15] == 1).all() and (d64[18:] == 32).all()
    d128 = llama3_rope_divisors(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    assert list(np.round(d128[29:35], 4)) == [1.2075, 1.5534, 2.0263, 2.6945, 3.6843, 5.2573]


def test_rope_scaling_recovered_from_divisors():
    d = llama3_rope_divisors(500000.0, 128, 32.0, 1.0, 4.0, 8192).astype(np.float32)
    assert recover_llama3_rope_scaling(d, 500000.0, 128) == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    # Non-Llama parameters: only L0/lf and L0/hf matter, so without a hint we get an equivalent triple...
    d = llama3_rope_divisors(500000.0, 128, 16.0, 2.0, 16.0, 4096).astype(np.float32)
    got = recover_llama3_rope_scaling(d, 500000.0, 128)
    assert got["factor"] == 16.0 and got["original_max_position_embeddings"] / got["low_freq_factor"] == 2048
    assert got["original_max_position_embeddings"] / got["high_freq_factor"] == pytest.approx(256)
    again = llama3_rope_divisors(500000.0, 128, 16.0, got["low_freq_factor"], got["high_freq_factor"],
                                 got["original_max_position_embeddings"])
    assert np.abs(again - d).max() < 1e-4
    # ...and with rope.scaling.original_context_length as a hint, the exact one.
    hinted = recover_llama3_rope_scaling(d, 500000.0, 128, 4096)
    assert (hinted["low_freq_factor"], hinted["high_freq_factor"]) == (2.0, 16.0)
    assert recover_llama3_rope_scaling(np.ones(64), 500000.0, 128) is None


def test_unrepresentable_rope_freqs_is_an_error():
    d = llama3_rope_divisors(500000.0, 128, 32.0, 1.0, 4.0, 8192)
    d[31] *= 1.01
    with pytest.raises(ValueError, match=r"x.gguf: cannot represent rope_freqs \[.*\] as llama3 RoPE scaling "
                                         r"\(factor 32.0\); no \(low_freq_factor"):
        recover_llama3_rope_scaling(d, 500000.0, 128, where="x.gguf")
    with pytest.raises(ValueError, match="rope_freqs has 10 values but head_dim 128 needs 64"):
        recover_llama3_rope_scaling(np.ones(10), 500000.0, 128)


# ---- logits parity ---------------------------------------------------------------------------------------


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [True, False])
def test_f32_logits_match_transformers(tiny_models, tiny_files, tied):
    import pocketllama

    ref = tiny_models[tied]
    llm = pocketllama.load(tiny_files["F32", tied], dtype=torch.float32)
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_quantized_logits_match_transformers_on_the_same_weights(tiny_models, tiny_files, qtype):
    """Oracle: transformers with every matrix replaced by gguf's quantize->dequantize done in HF row order.

    Blocks run along rows and the q/k permutation only moves whole rows, so quantizing before or after
    permuting gives the same numbers; both sides then compute with identical fp32 weights: atol 1e-5.
    """
    ref = _tiny_model(1, **UNTIED)
    original = {k: v.clone() for k, v in ref.state_dict().items()}
    err2 = norm2 = 0.0
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:
                q = gguf.quants.quantize(p.numpy(), QT[qtype])
                deq = torch.from_numpy(np.array(gguf.quants.dequantize(q, QT[qtype])).reshape(p.shape))
                err2, norm2 = err2 + (deq - p).square().sum().item(), norm2 + p.square().sum().item()
                p.copy_(deq)
    model = float_model_from_gguf(open_gguf(tiny_files[qtype, False]))
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(ours, ref(ids).logits, atol=1e-5, rtol=1e-5)
        ref.load_state_dict(original)
        exact = ref(ids).logits
    # And against the unquantized model: the relative logit error stays within 3x the relative weight error.
    # Independent noise on the ~4 quantized matmuls stacked on any path (embedding, 2 layers, lm_head) adds up
    # to ~sqrt(4) = 2x; measured 1.8-2.0x (Q8_0: 0.5% weights -> 1.0% logits, Q4_0: 8.6% -> 16%).
    rel_logits = ((ours - exact).norm() / exact.norm()).item()
    rel_weights = math.sqrt(err2 / norm2)
    assert rel_logits < 3 * rel_weights, (rel_logits, rel_weights)


# ---- the real SmolLM2-135M-Instruct Q4_1 file ------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return open_gguf(smollm2_gguf_path())


def test_smollm2_opens_fast_with_sane_config(smollm2):
    start = time.perf_counter()
    ckpt = open_gguf(smollm2_gguf_path())
    cfg = ckpt.hf_config()
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"opening SmolLM2 took {elapsed:.2f}s"  # measured ~0.05 s; gguf.GGUFReader takes ~2 s
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["intermediate_size"], cfg["head_dim"]) == (30, 576, 9, 3, 49152, 1536, 64)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_scaling"] is None
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["max_position_embeddings"]) == (100000.0, 1e-5, 8192)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert len(ckpt.metadata["tokenizer.ggml.tokens"]) == 49152 and len(ckpt.metadata["tokenizer.ggml.merges"]) == 48900
    assert ckpt.chat_template().startswith("{% for message in messages %}")
    assert ckpt.native_dtype == torch.float32
    assert ckpt.tensor_type("model.layers.0.mlp.up_proj.weight") == QT.Q4_1
    assert ckpt.tensor_type("model.embed_tokens.weight") == QT.Q8_0
    tok = ckpt.load_tokenizer()
    assert tok.vocab_size == 49152 and tok.eos_id == 2


# transformers' GGUF path (from_pretrained(gguf_file=...) needs accelerate; load_gguf_checkpoint is the
# function it calls): ~20 s to read and dequantize, so it is built once and the tests using it are slow.
@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = smollm2_gguf_path()
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = LlamaForCausalLM(config).float().eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    assert set(model.load_state_dict(tensors, strict=False).missing_keys) == {"lm_head.weight"}  # tied
    model.tie_weights()
    return model, tensors




@pytest.mark.slow
def test_smollm2_tensors_equal_transformers(smollm2, hf_smollm2):
    _, tensors = hf_smollm2
    assert sorted(tensors) == sorted(smollm2.tensor_names())
    for name, t in tensors.items():
        assert torch.equal(smollm2.load_tensor(name), t), name  # same blocks, same dequantizer, same un-permute


def _chat_ids(ckpt) -> list[int]:
    import jinja2

    text = jinja2.Environment().from_string(ckpt.chat_template()).render(
        messages=[{"role": "user", "content": "Name three colors of the rainbow and explain why the sky is blue."}],
        add_generation_prompt=True)
    return ckpt.load_tokenizer().encode(text, allow_special=True)


@pytest.mark.slow
def test_smollm2_logits_and_greedy_match_transformers(smollm2, hf_smollm2):
    import pocketllama

    ref, _ = hf_smollm2
    model = float_model_from_gguf(smollm2)
    ids = _chat_ids(smollm2)
    assert ids[:3] == [1, 9690, 198]  # <|im_start|>system\n
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x), ref(x).logits
        default = pocketllama.load(smollm2_gguf_path(), dtype=torch.float32).model(x)  # the public path
    # Identical weights (previous test), so only fp32 summation order may differ: measured bit-identical;
    # 1e-4 on logits up to ~38 leaves room for a different attention kernel, while a wrong permutation,
    # norm or rope moves logits by O(1).
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(default, theirs, atol=1e-3, rtol=1e-4)  # may run quantized kernels

    # Greedy, 64 tokens: our model through its KV cache vs transformers' generate, token for token.
    with torch.no_grad():
        expected = ref.generate(x, max_new_tokens=64, do_sample=False, eos_token_id=2, pad_token_id=2)[0, len(ids):]
        cache = model.make_cache(1, len(ids) + 64)
        logits = model(x, cache=cache)
        out: list[int] = []
        while len(out) < 64:
            out.append(int(logits[0, -1].argmax()))
            if out[-1] == 2:
                break
            pos = torch.tensor([[len(ids) + len(out) - 1]])
            logits = model(torch.tensor([[out[-1]]]), positions=pos, cache=cache)
    assert len(out) >= 16 and out == expected.tolist()


# ---- unsupported models, bad files, writer errors ---------------------------------------------------


def test_truncated_file(tmp_path, tiny_files):
    data = tiny_files["Q8_0", True].read_bytes()
    cut = write_bytes(tmp_path / "cut.gguf", data[: len(data) - 1000])
    fails_fast(cut, rf"cut.gguf is truncated: tensor 'blk.1.ffn_down.weight' needs bytes up to \d+ but the file "
                     rf"has {len(data) - 1000}$")  # the first tensor in table order that overruns
    head = write_bytes(tmp_path / "head.gguf", data[:300])  # too short for the metadata count
    fails_fast(head, r"head.gguf is truncated or corrupt: header claims 22 metadata entries, but a file of 300 "
                      r"bytes can hold at most 21")
    infos = open_gguf(tiny_files["Q8_0", True])._file.data_offset
    mid = write_bytes(tmp_path / "mid.gguf", data[: infos - 40])  # inside the tensor table
    fails_fast(mid, r"mid.gguf is truncated or corrupt: tensor name #\d+ has a string length of \d+ bytes at offset "
                    r"\d+, past the end of the file \(\d+ bytes\)")
    tiny = write_bytes(tmp_path / "tiny.gguf", b"GGUF\x03\x00")
    fails_fast(tiny, r"tiny.gguf is truncated: a GGUF header needs 24 bytes but the file has 6")


def test_unsupported_architecture(tmp_path):
    data = build_gguf(llama_kvs("qwen2"), [("blk.0.attn_norm.weight", [64], 0, 0)], data=f32_tensor_bytes(64))
    ckpt = open_gguf(write_bytes(tmp_path / "q.gguf", data))  # the container is fine; the model is not
    with pytest.raises(ValueError, match=r"q.gguf: GGUF architecture 'qwen2' is not supported; pocketllama reads: "
                                         r"llama$"):
        ckpt.hf_config()
    with pytest.raises(ValueError, match="GGUF architecture 'qwen2' is not supported"):
        ckpt.tensor_names()


def test_unsupported_tensor_type(tmp_path):
    q8_1 = int(QT.Q8_1)  # known to ggml, not dequantizable by the gguf package
    data = build_gguf(llama_kvs(), [("blk.0.attn_q.weight", [64, 64], q8_1, 0)], data=b"\0" * (64 * 2 * 40))
    ckpt = open_gguf(write_bytes(tmp_path / "q81.gguf", data))
    fails_fast(ckpt, r"q81.gguf: GGUF tensor 'blk.0.attn_q.weight' has type Q8_1, which pocketllama cannot read; "
                      r"supported: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, ",
                call=lambda c: c.load_tensor("model.layers.0.self_attn.q_proj.weight"))


def test_unknown_tensor_names_are_listed(tmp_path):
    tensors = [("blk.0.attn_norm.weight", [64], 0, 0), ("blk.0.attn_rot_embd", [64], 0, 256),
               ("blk.5.ffn_up.weight", [64], 0, 512), ("blk.0.attn_norm.bias", [64], 0, 768)]
    ckpt = open_gguf(write_bytes(tmp_path / "u.gguf", build_gguf(llama_kvs(), tensors, data=b"\0" * 1024)))
    with pytest.raises(ValueError, match=r"u.gguf has tensors pocketllama does not know for a 1-layer llama: "
                                         r"blk.0.attn_rot_embd, blk.5.ffn_up.weight, blk.0.attn_norm.bias \(3 in all\)"):
        ckpt.tensor_names()
    _, ok = valid_gguf(tmp_path)
    with pytest.raises(KeyError, match="ok.gguf has no tensor for 'model.nope.weight'"):
        open_gguf(ok).load_tensor("model.nope.weight")


def test_config_errors(tmp_path):
    embd = [("token_embd.weight", [64, 10], 0, 0)]
    data = f32_tensor_bytes(640)

    def cfg(kvs, name):
        return open_gguf(write_bytes(tmp_path / name, build_gguf(kvs, embd, data=data))).hf_config()

    kvs = [kv for kv in llama_kvs() if kv[0] != "llama.block_count"]
    with pytest.raises(ValueError, match=r"m.gguf lacks metadata key 'llama.block_count', which a llama GGUF must"):
        cfg(kvs, "m.gguf")
    with pytest.raises(ValueError, match=r"v.gguf: llama.vocab_size 11 disagrees with token_embd.weight's 10 rows"):
        cfg(llama_kvs(vocab_size=11), "v.gguf")
    with pytest.raises(ValueError, match=r"r.gguf: key_length 32, value_length 32 and rope.dimension_count 16 "
                                         r"differ"):
        cfg(llama_kvs(**{"rope.dimension_count": 16}), "r.gguf")
    with pytest.raises(ValueError, match=r"y.gguf: unknown rope.scaling.type 'longrope' \(known: none, linear, yarn"):
        cfg(llama_kvs() + [("llama.rope.scaling.type", VT.STRING, "longrope")], "y.gguf")
    linear = llama_kvs() + [("llama.rope.scaling.type", VT.STRING, "linear"),
                            ("llama.rope.scaling.factor", VT.FLOAT32, 4.0)]
    assert cfg(linear, "l.gguf")["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    both = build_gguf(linear, embd + [("rope_freqs.weight", [16], 0, 2560)], data=data + b"\0" * 64)
    with pytest.raises(ValueError, match="has both rope_freqs.weight .* and rope.scaling.type 'linear'"):
        open_gguf(write_bytes(tmp_path / "b.gguf", both)).hf_config()
    bad = build_gguf(llama_kvs(), embd + [("rope_freqs.weight", [16], 0, 2560)],
                     data=data + np.linspace(1, 3, 16, dtype=np.float32).tobytes())
    with pytest.raises(ValueError, match="rf.gguf: cannot represent rope_freqs"):
        open_gguf(write_bytes(tmp_path / "rf.gguf", bad)).hf_config()


def test_writer_errors(tmp_path, tiny_models):
    model = tiny_models[False]
    cfg, sd = model.config.to_dict(), model.state_dict()
    with pytest.raises(ValueError, match="cannot write GGUF type 'Q4_K'; choose one of F32, F16, BF16, Q8_0"):
        write_gguf(tmp_path / "x.gguf", cfg, sd, qtype="Q4_K")
    with pytest.raises(ValueError, match="tie_word_embeddings is false but the state dict has no 'lm_head.weight'"):
        write_gguf(tmp_path / "x.gguf", cfg, {k: v for k, v in sd.items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match="no GGUF name for tensor 'model.layers.0.self_attn.rotary.inv_freq'"):
        write_gguf(tmp_path / "x.gguf", cfg, {**sd, "model.layers.0.self_attn.rotary.inv_freq": torch.zeros(8)})
    with pytest.raises(ValueError, match="metadata 'tokenizer.ggml.merges' is an empty list"):
        write_gguf(tmp_path / "x.gguf", cfg, sd, {"tokenizer.ggml.merges": []})
    with pytest.raises(ValueError, match="write_gguf writes llama models, not model_type 'mllama'"):
        write_gguf(tmp_path / "x.gguf", {**cfg, "model_type": "mllama"}, sd)


def test_rows_not_divisible_by_the_block_fall_back_to_f16(tmp_path):
    model = _tiny_model(2, intermediate_size=80)  # down_proj rows of 80 values: not a multiple of 32
    path = write_gguf(tmp_path / "f.gguf", model.config.to_dict(), model.state_dict(), qtype="Q4_0")
    ckpt = open_gguf(path)
    assert ckpt.tensor_type("model.layers.0.mlp.down_proj.weight") == QT.F16
    assert ckpt.tensor_type("model.layers.0.mlp.up_proj.weight") == QT.Q4_0


# ---- memory ----------------------------------------------------------------------------------------------

_LOAD_ALL = """
import resource, sys, time, torch
from pocketllama.weights.gguf import open_gguf
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base, start = rss(), time.perf_counter()
ckpt = open_gguf(sys.argv[1])
state = {}  # what the loader does: keep every tensor (assigned into the model)
for name in ckpt.tensor_names():
    t = state[name] = ckpt.load_tensor(name)  # native dtype: float32 for a quantized file
    assert t.dtype == torch.float32 and tuple(t.shape) == ckpt.tensor_shape(name), name
    assert bool(torch.isfinite(t).all()) and float(t.abs().max()) > 0, name
total = sum(t.numel() * 4 for t in state.values())
print(len(state), total, rss() - base, time.perf_counter() - start)
"""


def test_smollm2_every_tensor_loads_with_one_copy_in_memory():
    """All 272 tensors dequantize (finite, right shape); peak RSS = the fp32 model + one tensor's work."""
    out = subprocess.run([sys.executable, "-c", _LOAD_ALL, str(smollm2_gguf_path())],
                         capture_output=True, text=True, check=True)
    n, total, extra, seconds = out.stdout.split()
    assert (int(n), int(total)) == (30 * 9 + 2, 538_060_032)  # 134.5M parameters as fp32
    # Transients: the biggest tensor, token_embd (49152 x 576), is 113 MB in fp32 plus gguf's fp32 temporaries;
    # the file's pages (98 MB) are dropped after each tensor. Measured +576 MB; a second copy would be +1 GB.
    assert int(extra) < int(total) + 150e6, f"peak RSS grew by {int(extra) / 1e6:.0f} MB in {float(seconds):.1f}s"
