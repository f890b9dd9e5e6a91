"""HF safetensors folders: single and sharded files, errors that list every problem, memory held once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import save_tiny_llama
from safetensors.torch import save_file

from pocketllama.config import TextConfig
from pocketllama.llm import load_model
from pocketllama.weights.base import WeightsMismatchError
from pocketllama.weights.safetensors import SafetensorsFile


def test_mmap_views_share_the_file(tmp_path):
    save_file({"a": torch.arange(6, dtype=torch.float32).view(2, 3)}, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(tmp_path / "x.safetensors")
    t = f.get("a")
    assert t.shape == (2, 3) and t[1, 2] == 5
    assert f.get("a", torch.bfloat16).dtype == torch.bfloat16


def _mutate(tmp_path, fn):
    ref = save_tiny_llama(tmp_path)
    state = {k: v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    fn(state)
    save_file(state, str(tmp_path / "model.safetensors"))


def test_mismatch_lists_missing_unexpected_and_misshaped(tmp_path):
    def fn(state):
        del state["model.layers.1.mlp.up_proj.weight"]
        state["model.layers.0.self_attn.rotary.weight"] = torch.zeros(2)
        state["model.norm.weight"] = torch.zeros(65)

    _mutate(tmp_path, fn)
    with pytest.raises(WeightsMismatchError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): model.layers.0.self_attn.rotary.weight" in msg
    assert "wrong shape (1): model.norm.weight: checkpoint (65,) vs model (64,)" in msg


def test_truncated_safetensors(tmp_path):
    save_tiny_llama(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is truncated or corrupt: tensor .* data ends past"):
        load_model(tmp_path)


def test_garbage_safetensors(tmp_path):
    save_tiny_llama(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        load_model(tmp_path)


def test_missing_shard_named(tmp_path):
    save_tiny_llama(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"names shard {shard}, which is missing"):
        load_model(tmp_path)


def test_no_weights(tmp_path):
    save_tiny_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_model(tmp_path)


def test_bad_dtype_argument(tmp_path):
    save_tiny_llama(tmp_path)
    with pytest.raises(ValueError, match="dtype 'int4' is not supported"):
        load_model(tmp_path, dtype="int4")


_RSS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pocketllama.llm import load_model

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    # Warm-up: building the model touches code pages of libtorch (~80 MB) that are not weights.
    from pocketllama.config import TextConfig
    from pocketllama.models.llama import LlamaForCausalLM
    from pocketllama.weights.safetensors import SafetensorsCheckpoint
    from pathlib import Path
    with torch.device("meta"):
        LlamaForCausalLM(TextConfig.from_hf(SafetensorsCheckpoint(Path(sys.argv[1])).hf_config()))
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS")
    model, _ = load_model(sys.argv[1], dtype=sys.argv[2])
    with torch.no_grad():
        touched = sum(float(p.float().sum()) for p in model.parameters())  # fault every page in
    print(status("VmHWM") - base)
""")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """~100 MB bf16 checkpoint written directly (no transformers init needed)."""
    path = tmp_path_factory.mktemp("big")
    cfg = TextConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                     num_attention_heads=16, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
                     torch_dtype="bfloat16")
    from pocketllama.models.llama import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg.to_hf()))
    return path, (path / "model.safetensors").stat().st_size


@pytest.mark.parametrize("dtype,bound", [("bfloat16", 1.25), ("float32", 2.3)])
def test_peak_rss_holds_one_copy(big_checkpoint, dtype, bound):
    """bf16 load: one anonymous copy plus one tensor (<= 1.25x file). fp32 load: the fp32 copy (2x) plus one."""
    path, size = big_checkpoint
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), dtype], capture_output=True, text=True,
                         check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < bound * size, f"peak RSS grew {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"


def test_tiktoken_tokenizer_model_fallback(tmp_path):
    import shutil

    from conftest import llama3_tokenizer_path

    from pocketllama.llm import load

    save_tiny_llama(tmp_path, vocab_size=128256, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                    num_key_value_heads=1, num_hidden_layers=1)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json or tokenizer.model"):
        load(tmp_path)
    (tmp_path / "original").mkdir()
    shutil.copy(llama3_tokenizer_path(), tmp_path / "original" / "tokenizer.model")
    llm = load(tmp_path)
    assert llm.tokenizer.encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]


def test_loaded_weights_own_their_memory_not_the_file(tiny_llama_dir):
    """Weights are copies in anonymous memory (huge pages where the kernel allows): the checkpoint file can
    change or vanish under a loaded model, and big tensors sit 2 MiB-aligned for the GEMV kernels."""
    from pocketllama.weights.hugepages import HUGE_PAGE, empty_huge

    model, _ = load_model(tiny_llama_dir[0], dtype="float32")
    w = model.model.layers[0].self_attn.q_proj.weight
    assert w.untyped_storage().resizable()  # not a torch.frombuffer view of the mapped file
    big = empty_huge((HUGE_PAGE // 2 + 3,), torch.bfloat16)
    assert big.data_ptr() % HUGE_PAGE == 0 and big.numel() == HUGE_PAGE // 2 + 3
    big.fill_(1.5)
    assert float(big.float().sum()) == 1.5 * big.numel()
