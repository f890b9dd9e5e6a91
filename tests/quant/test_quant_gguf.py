"""GGUF Q8_0 / Q4_0 / Q4_1 blocks loaded straight into int8 / int4 modules: same logits as the dequantized
path, and the real SmolLM2 Q4_1 file loads within 2x its size of peak RSS."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import smollm2_gguf_path, tiny_llama_config
from weights.gguf_fixtures import tiny_tokenizer_meta

from pocketllama.llm import load_model
from pocketllama.quant import Int4Linear, Int8Embedding, Int8Linear
from pocketllama.weights.gguf_write import write_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """Untied tiny llama (GQA, llama3 rope) written as Q8_0, Q4_0 and Q4_1 GGUF files."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(5)
    config = tiny_llama_config(tie_word_embeddings=False, hidden_size=128, intermediate_size=256)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("gguf")
    files = {}
    for qtype in ("Q8_0", "Q4_0", "Q4_1"):
        files[qtype] = write_gguf(folder / f"tiny-{qtype}.gguf", config.to_dict(), model.state_dict(),
                                  tiny_tokenizer_meta(config.vocab_size), qtype)
    return files


@torch.no_grad()
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_blocks_kept_quantized_give_the_dequantized_logits(tiny_gguf, qtype):
    quantized, _ = load_model(tiny_gguf[qtype], dtype=torch.float32)
    dequantized, _ = load_model(tiny_gguf[qtype], dtype=torch.float32, quantize=False)
    kind = Int8Linear if qtype == "Q8_0" else Int4Linear
    q_proj = quantized.model.layers[0].self_attn.q_proj  # q/k rows un-permuted as whole rows of blocks
    assert isinstance(q_proj, kind) and q_proj.group_size == 32
    if kind is Int4Linear:  # Q4_0 has no offsets, so no zeros are stored; Q4_1's offsets become zeros
        assert q_proj.symmetric == (qtype == "Q4_0") and (q_proj.zeros is None) == (qtype == "Q4_0")
    assert isinstance(quantized.lm_head, kind)
    embed = quantized.model.embed_tokens
    assert isinstance(embed, Int8Embedding) if qtype == "Q8_0" else type(embed).__name__ == "Embedding"
    assert type(dequantized.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    ids = torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(quantized(ids), dequantized(ids), rtol=1e-5, atol=1e-5)
    # and in bf16 (PyTorch's packed kernels for int4): within bf16 rounding of the same model
    bf16, _ = load_model(tiny_gguf[qtype], dtype=torch.bfloat16)
    rel = ((bf16(ids).float() - dequantized(ids)).norm() / dequantized(ids).norm()).item()
    assert rel < 0.02, rel


def test_a_recipe_requantizes_gguf_weights(tiny_gguf):
    model, _ = load_model(tiny_gguf["Q8_0"], dtype=torch.float32, quantize="int4-g32")
    assert isinstance(model.model.layers[0].mlp.up_proj, Int4Linear)
    assert model.config.quantization["linear"] == "int4"


_RSS = textwrap.dedent("""
    import sys, torch
    from pocketllama.llm import load_model
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    from pocketllama.config import TextConfig
    from pocketllama.models.llama import LlamaForCausalLM
    from pocketllama.weights.gguf import open_gguf
    from pocketllama.quant import kernels
    with torch.device("meta"):  # warm-up: libtorch code pages touched by building a model are not weights
        LlamaForCausalLM(TextConfig.from_hf(open_gguf(sys.argv[1]).hf_config()))
    kernels.extension()  # nor is the C++ kernel library (code, loaded once)
    from pocketllama.quant.ext import kernels
    kernels()  # warm-up: building/loading the C++ kernels (code, not weights) happens once per machine
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    model, _ = load_model(sys.argv[1])
    peak = status("VmHWM") - base  # buffers are fresh copies of the blocks: resident once assigned
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 49152)
    print(peak, type(model.model.layers[0].mlp.up_proj).__name__)
""")


def test_smollm2_q4_1_loads_quantized_within_twice_the_file_size():
    """Measured 167-171 MB for the 98 MB file (bound 197 MB): modules take their parts as soon as they are
    read, and big transient blocks are unmapped when freed (weights/hugepages.py)."""
    path = smollm2_gguf_path()
    out = subprocess.run([sys.executable, "-c", _RSS, str(path)], capture_output=True, text=True, check=True)
    growth, kind = out.stdout.split()
    size = path.stat().st_size
    assert kind == "Int4Linear"
    assert int(growth) < 2 * size, f"peak RSS grew {int(growth) / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
