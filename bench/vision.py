"""Llama 3.2 Vision on this CPU: time to encode one 560x560 image, prefill and decode tokens/s, peak RSS;
pocketllama vs transformers, each engine in a fresh process, random weights.

Shapes (SPEC 2.1):
  reduced  the 11B vision encoder at full width (1280, 16 heads, 560 tiles, 4 x 1608 tokens) but 8 local + 2
           gated global layers (instead of 32 + 8), and a Llama-3.2-1B-shaped text trunk with 4 cross-attention
           layers; bf16, both engines. `encode x4 (est.)` scales the encode time to the full 40-layer depth.
  11b      Llama-3.2-11B-Vision-Instruct (~21 GB bf16 written once to bench/.cache in 2 GB shards); pocketllama
           only, quantized while loading with recipe int4-g32-e4g128-v8: text linears int4 (group 32), embedding
           and lm_head int4 (group 128), vision linears and projector int8 (`--vision bf16`: int4-g32-e4g128,
           the vision tower as stored).

    python bench/vision.py [--shape reduced|11b] [--threads 2] [--no-peers] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RSS_HELPERS, llama3_tokenizer_model, run_json, save, table  # noqa: E402

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
TEXT_11B = {"model_type": "mllama_text_model", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
            "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "max_position_embeddings": 131072,
            "rope_scaling": ROPE, "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128004, "hidden_act": "silu", "dropout": 0}
VISION_11B = {"model_type": "mllama_vision_model", "hidden_size": 1280, "intermediate_size": 5120,
              "num_hidden_layers": 32, "num_global_layers": 8, "attention_heads": 16, "num_channels": 3,
              "image_size": 560, "patch_size": 14, "norm_eps": 1e-5, "max_num_tiles": 4, "hidden_act": "gelu",
              "intermediate_layers_indices": [3, 7, 15, 23, 30], "vision_output_dim": 7680,
              "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]}
SHAPES = {
    "11b": {"text_config": TEXT_11B, "vision_config": VISION_11B},
    "reduced": {
        "text_config": {**TEXT_11B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 20,
                        "cross_attention_layers": [3, 8, 13, 18]},
        "vision_config": {**VISION_11B, "num_hidden_layers": 8, "num_global_layers": 2,
                          "intermediate_layers_indices": [1, 3, 5, 6, 7]},
    },
}
DEPTH_SCALE = {"11b": 1.0, "reduced": 40 / 10}  # full encoder layers / measured encoder layers
PREPROCESSOR = {"image_processor_type": "MllamaImageProcessor", "size": {"height": 560, "width": 560},
                "max_image_tiles": 4, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "do_pad": True, "do_resize": True,
                "do_convert_rgb": True}


def random_vision_checkpoint(shape: str, shard_bytes: int = 2 << 30) -> Path:
    """An HF Mllama folder with random bf16 weights (classic Hub names), written shard by shard so that
    at most one shard is ever in memory."""
    import torch
    from safetensors.torch import save_file

    from pocketllama.config import MllamaConfig
    from pocketllama.models.mllama import MllamaForConditionalGeneration

    path = CACHE / f"llama-3.2-vision-{shape}"
    if (path / "model.safetensors.index.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
              "image_token_index": 128256, "torch_dtype": "bfloat16", **SHAPES[shape]}
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(MllamaConfig.from_hf(config))
        shapes = {k: v.shape for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 24, generator=g) * 0.02).to(torch.bfloat16)  # tiled: writing is I/O, not RNG
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for k, s in shapes.items():
        if k.endswith("norm.weight") or "layernorm" in k and k.endswith("weight"):
            t = torch.ones(s, dtype=torch.bfloat16)
        elif "gate" in k and len(s) == 1:
            t = torch.full(s, 0.5, dtype=torch.bfloat16)
        else:
            n = s.numel()
            start = int(torch.randint(0, pool.numel(), (1,), generator=g))
            t = pool.roll(-start).repeat(-(-n // pool.numel()))[:n].view(s).clone()
        shard[k] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    shutil.copy(llama3_tokenizer_model(), path / "tokenizer.model")
    index = {"metadata": {"total_size": sum(v.numel() * 2 for v in shapes.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))  # written last: marks the folder done
    return path


COMMON = RSS_HELPERS + '''
import torch
torch.set_num_threads(int(sys.argv[2]))
from PIL import Image
import importlib.util, pathlib
PHOTO = pathlib.Path(importlib.util.find_spec("llama_models").origin).parent / "resources" / "pasta.jpeg"
IMAGE = Image.open(PHOTO).convert("RGB").resize((560, 560))  # one 560x560 image: one real tile (of 4)
TEXT = ("Describe this image in detail: the dish, the plate, the table, the light, and what the cook may have "
        "had in mind. ") * 6
'''

POCKETLLAMA = COMMON + '''
import pocketllama
from pocketllama.engine.generate import stream_generate
from pocketllama.engine.sampling import SamplingParams
from pocketllama.vision import image_processor
quantize = sys.argv[3]
t = time.perf_counter()
llm = pocketllama.load(sys.argv[1], dtype="bfloat16", quantize=None if quantize == "none" else quantize)
load_s = time.perf_counter() - t
load_peak = peak_mb()
model = llm.model
msgs = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": TEXT}]}]
ids = llm.apply_chat_template(msgs, date_string="26 Jul 2024")
images = image_processor(model, llm.source)([[IMAGE]])
params = SamplingParams(max_tokens=int(sys.argv[4]), ignore_eos=True)
with torch.inference_mode():
    cache = model.make_cache(1, 512)
    t = time.perf_counter()
    model.set_images(cache, images, [ids])  # vision encoder + projector + every cross layer's K/V
    encode_s = time.perf_counter() - t
    last = None
    for last in stream_generate(model, llm.tokenizer, ids, params, cache=cache):
        pass
print(json.dumps({"load_s": load_s, "encode_s": encode_s, "prompt_tokens": last.prompt_tokens,
                  "prefill_tps": last.prompt_tps, "decode_tps": last.generation_tps, "load_peak_mb": load_peak,
                  "peak_rss_mb": peak_mb()}))
'''

TRANSFORMERS = COMMON + '''
from transformers import MllamaForConditionalGeneration, MllamaImageProcessorPil
from pocketllama.image_processing import cross_attention_mask
import pocketllama
t = time.perf_counter()
model = MllamaForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
load_s = time.perf_counter() - t
load_peak = peak_mb()
from pocketllama.chat_format import get_chat_format
from pocketllama.tokenizer import Tokenizer
fmt = get_chat_format(Tokenizer.from_tiktoken(pathlib.Path(sys.argv[1]) / "tokenizer.model"), image_token_id=128256)
msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXT}]}]
ids = fmt.encode(msgs, date_string="26 Jul 2024")
inputs = MllamaImageProcessorPil.from_pretrained(sys.argv[1])(images=[[IMAGE]], return_tensors="pt")
x = torch.tensor([ids])
xmask = cross_attention_mask([ids], inputs["num_tiles"], 128256)
n = int(sys.argv[4])
kw = dict(pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
          aspect_ratio_mask=inputs["aspect_ratio_mask"], cross_attention_mask=xmask, do_sample=False)
with torch.inference_mode():
    t = time.perf_counter()
    model.model.vision_model(pixel_values=inputs["pixel_values"].to(torch.bfloat16),
                             aspect_ratio_ids=inputs["aspect_ratio_ids"], aspect_ratio_mask=inputs["aspect_ratio_mask"])
    encode_s = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
    first = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
    total = time.perf_counter() - t
print(json.dumps({"load_s": load_s, "encode_s": encode_s, "prompt_tokens": len(ids),
                  "prefill_tps": len(ids) / max(first - encode_s, 1e-9), "decode_tps": (n - 1) / (total - first),
                  "load_peak_mb": load_peak, "peak_rss_mb": peak_mb()}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="reduced")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--new-tokens", default="16")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--vision", choices=["int8", "bf16"], default="int8", help="11b: the vision tower's storage")
    args = ap.parse_args()
    os.environ["BENCH_THREADS"] = args.threads
    print(f"[{args.shape}] writing / reusing the random checkpoint ...", file=sys.stderr, flush=True)
    path = random_vision_checkpoint(args.shape)
    engines: list[tuple[str, str, str]] = []
    if args.shape == "11b":
        recipe = "int4-g32-e4g128-v8" if args.vision == "int8" else "int4-g32-e4g128"
        engines.append((f"pocketllama {recipe}", POCKETLLAMA, recipe))
    else:
        engines.append(("pocketllama bf16", POCKETLLAMA, "none"))
        if not args.no_peers:
            engines.append(("transformers 5 bf16", TRANSFORMERS, "none"))
    rows: list[dict[str, Any]] = []
    for engine, code, quantize in engines:
        print(f"[{args.shape}] {engine} ...", file=sys.stderr, flush=True)
        r = run_json(code, str(path), args.threads, quantize, args.new_tokens,
                     timeout=7200)
        if "encode_s" in r:
            r["encode x4 (est.)" if args.shape == "reduced" else "encode full"] = r["encode_s"] * DEPTH_SCALE[args.shape]
        rows.append({"shape": args.shape, "engine": engine, **r})
    cols = ["shape", "engine", "load_s", "encode_s", "encode x4 (est.)" if args.shape == "reduced" else "encode full",
            "prompt_tokens", "prefill_tps", "decode_tps", "load_peak_mb", "peak_rss_mb", "error"]
    print(table(rows, [c for c in cols if any(c in r for r in rows)]))
    print(f"saved {save(f'vision-{args.shape}', rows, {'new_tokens': args.new_tokens})}", file=sys.stderr)


if __name__ == "__main__":
    main()
