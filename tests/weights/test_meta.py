"""Meta original layout (params.json + consolidated.00.pth, interleaved q/k rows) gives the HF logits."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import LLAMA3_ROPE_32, save_tiny_llama

from pocketllama.llm import load_model
from pocketllama.weights.meta import hf_to_meta_rows, meta_to_hf_rows

# Meta params.json cannot express original_max_position_embeddings: Llama 3 uses 8192.
META_ROPE = {**LLAMA3_ROPE_32, "original_max_position_embeddings": 8192}

_TO_META = {
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight", "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def write_meta_checkpoint(ref, folder, shards: int = 1) -> None:
    """Write `ref` (an HF LlamaForCausalLM) in Meta's layout: inverse permutation, Meta names, params.json."""
    cfg = ref.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    state = {}
    for name, t in ref.state_dict().items():
        if name == "model.embed_tokens.weight":
            state["tok_embeddings.weight"] = t
        elif name == "model.norm.weight":
            state["norm.weight"] = t
        elif name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                state["output.weight"] = t
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            if rest == "self_attn.q_proj.weight":
                t = hf_to_meta_rows(t, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj.weight":
                t = hf_to_meta_rows(t, cfg.num_key_value_heads)
            state[f"layers.{layer}.{_TO_META[rest]}"] = t
    state["rope.freqs"] = torch.ones(hd // 2)  # present in some original checkpoints; skipped by loaders
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size, "multiple_of": 32,
              "ffn_dim_multiplier": None, "norm_eps": cfg.rms_norm_eps, "rope_theta": 500000.0,
              "use_scaled_rope": True, "rope_scaling_factor": 32.0, "max_seq_len": 1024}
    # intermediate 160 from multiple_of 32: int(2*4*64/3)=170 -> 192; so set hidden_dim explicitly.
    params["hidden_dim"] = cfg.intermediate_size
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    if shards == 1:
        torch.save({k: v.clone() for k, v in state.items()}, folder / "consolidated.00.pth")
        return
    dims = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1, "tok_embeddings": 0, "output": 0}
    for i in range(shards):
        part = {}
        for k, v in state.items():
            key = k.split(".")[-2] if k.startswith("layers.") else k.split(".")[0]
            d = dims.get(key)
            part[k] = v.clone() if d is None else v.chunk(shards, dim=d)[i].clone()
        torch.save(part, folder / f"consolidated.{i:02d}.pth")


def test_permutation_round_trip():
    w = torch.randn(4 * 16, 8)
    torch.testing.assert_close(meta_to_hf_rows(hf_to_meta_rows(w, 4), 4), w)
    # Within a head, HF row p*(hd/2)+i == Meta row 2i+p (SPEC 1.5).
    meta = hf_to_meta_rows(w, 4)
    assert torch.equal(meta[2 * 3 + 1], w[1 * 8 + 3])


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_layout_gives_hf_logits(tmp_path, shards):
    ref = save_tiny_llama(tmp_path / "hf", tie_word_embeddings=False, rope_scaling=dict(META_ROPE))
    write_meta_checkpoint(ref, tmp_path / "meta", shards=shards)
    model, ckpt = load_model(tmp_path / "meta", dtype=torch.float32)
    assert ckpt.config.rope_scaling.factor == 32.0
    ids = torch.randint(0, ref.config.vocab_size, (2, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_meta_checkpoint_without_output_is_tied(tmp_path):
    ref = save_tiny_llama(tmp_path / "hf", tie_word_embeddings=True, rope_scaling=dict(META_ROPE))
    write_meta_checkpoint(ref, tmp_path / "meta")
    model, ckpt = load_model(tmp_path / "meta", dtype=torch.float32)
    assert ckpt.config.tie_word_embeddings and not hasattr(model, "lm_head")
    ids = torch.randint(0, ref.config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path, capsys):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    with open(folder / "consolidated.00.pth", "wb") as f:
        pickle.dump({"tok_embeddings.weight": _Evil()}, f)
    with pytest.raises(ValueError, match="cannot read .*consolidated.00.pth as a weights-only PyTorch checkpoint"):
        load_model(folder)
    assert "pwned" not in capsys.readouterr().out


def test_missing_weights_file(tmp_path):
    (tmp_path / "params.json").write_text("{}")
    (tmp_path / "consolidated.00.pth").write_bytes(b"")
    (tmp_path / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_model(tmp_path)
