"""`merge_adapter(base, adapter, out)`: fold a LoRA adapter into its base model and write an HF checkpoint.

A quantized base (a recorded recipe, or GGUF Q4/Q8 blocks) is merged through float weights and re-quantized,
then checked: merging straight into quantized weights loses small adapter updates (they round away), so the
change the adapter makes in float (merged - base) must survive in the quantized models (re-quantized merged -
quantized base) on a probe conversation.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The probe is a short chat (in the model's chat format when it has one): where an SFT adapter acts.
PROBE = [{"role": "user", "content": "What is the capital of France? Answer briefly."},
         {"role": "assistant", "content": "The capital of France is Paris, on the Seine."},
         {"role": "user", "content": "Explain how a rainbow forms in two sentences."},
         {"role": "assistant", "content": "Sunlight refracts and reflects inside raindrops, splitting into colours."}]
# Share of the adapter's float logit change that must survive quantization: retention = 1 - |dq - df| / |df|
# with df = float merged - float base and dq = re-quantized merged - quantized base. Below it the adapter is
# largely lost (an update under the quantization step rounds away: dq ~ 0, retention ~ 0).
MIN_RETENTION = 0.5


@dataclass
class MergeReport:
    output: Path
    recipe: str | None  # the re-quantization recipe, None = float weights
    adapter_effect: float  # relative logit change the adapter makes (float base -> float merged)
    merge_error: float  # float merged vs the adapter applied unmerged (should be ~1e-6)
    quant_error: float | None = None  # re-quantized merged vs float merged
    retention: float | None = None  # share of the adapter's change that survives quantization (see MIN_RETENTION)
    top1_agreement: float | None = None  # share of probe positions whose argmax survives re-quantization

    def summary(self) -> str:
        lines = [f"merged into {self.output} ({self.recipe or 'float weights'}); adapter effect "
                 f"{self.adapter_effect:.3g}, merge error {self.merge_error:.2g}"]
        if self.quant_error is not None:
            lines.append(f"re-quantized to {self.recipe}: adapter retained {self.retention:.0%}, error vs float "
                         f"merged {self.quant_error:.3g}, top-1 agreement {self.top1_agreement:.0%}")
        return "\n".join(lines)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def base_recipe(checkpoint: Any, config: Any) -> str | None:
    """The recipe a quantized base was stored with (a GGUF's Q4 / Q8 blocks map to int4-g32 / int8)."""
    from ..quant.handler import plan_for_gguf
    from ..quant.recipe import Recipe

    if config.quantization:
        return Recipe.from_dict(config.quantization).name
    if hasattr(checkpoint, "raw_tensor") and hasattr(checkpoint, "tensor_type"):
        plan = plan_for_gguf(checkpoint)
        if plan:
            return "int4-g32" if any(s.kind == "int4" for s in plan.values()) else "int8"
    return None


def merge_adapter(base: str | os.PathLike[str] | None, adapter: str | os.PathLike[str],
                  output: str | os.PathLike[str], *, dtype: str | None = None, quantize: str | None = "auto",
                  check: bool = True) -> MergeReport:
    """Write base + adapter as one checkpoint folder (config.json, model.safetensors, tokenizer files).

    quantize: "auto" = as the base was stored (float stays float; a quantized base is re-quantized with its
    recipe), "none" = float weights, or a recipe name (int8, int4-g32, ...). check: refuse a re-quantized
    result that lost the adapter (see MAX_LOSS_RATIO); the float merge is always checked.
    """
    from ..llm import load, load_model
    from ..models import config_from_hf
    from ..quant import quantize_model
    from ..quant.save import copy_tokenizer
    from ..sources import resolve
    from ..weights import open_checkpoint
    from ..weights.safetensors import save_safetensors
    from .lora import merge_lora
    from .peft_format import load_adapter

    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} exists and is not an empty folder; choose a new folder")
    checkpoint = open_checkpoint(resolve(base))
    stored = base_recipe(checkpoint, getattr(checkpoint, "config", None) or config_from_hf(checkpoint.hf_config()))
    recipe = stored if quantize == "auto" else (None if quantize in (None, "none", "float") else quantize)

    llm = load(base, dtype=dtype, quantize=False, progress=False)
    model = llm.model
    ids = torch.tensor([_probe_ids(llm)])
    with torch.no_grad():
        before = model(ids)
    load_adapter(model, adapter, dropout=0.0)
    model.eval()
    with torch.no_grad():
        adapted = model(ids)
        merge_lora(model)
        merged = model(ids)
    report = MergeReport(out, recipe, _rel(before, adapted), _rel(merged, adapted))
    if report.merge_error > 1e-3 and llm.dtype == torch.float32:
        raise RuntimeError(f"merging changed the model's outputs by {report.merge_error:.3g}; this is a bug")
    if recipe is not None:
        quantize_model(model, recipe)
        with torch.no_grad():
            requant = model(ids)
        report.quant_error = _rel(requant, merged)
        report.top1_agreement = float((requant.argmax(-1) == merged.argmax(-1)).float().mean())
        # the quantized base as the user runs it: as stored, or quantized with the requested recipe
        qbase, _ = load_model(base, dtype=dtype, quantize=None if recipe == stored else recipe, progress=False)
        with torch.no_grad():
            quant_before = qbase(ids)
        del qbase
        report.retention = 1 - _rel(requant - quant_before, merged - before)
        if check and report.retention < MIN_RETENTION:
            raise ValueError(
                f"re-quantized to {recipe}, the merged model keeps only {report.retention:.0%} of the adapter's "
                f"change (adapter effect {report.adapter_effect:.3g}, re-quantization error {report.quant_error:.3g}): "
                "the adapter would be largely lost. Write float weights (--quantize none), pick a finer recipe "
                "(int8), or serve the base with the adapter unmerged (chat --adapter)")
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_safetensors(state, out / "model.safetensors", metadata={"format": "pt"})
    _write_config(model.config, checkpoint, out, llm.dtype)
    copy_tokenizer(checkpoint, out)
    source_dir = Path(checkpoint.path) if Path(checkpoint.path).is_dir() else None
    if source_dir is not None and (source_dir / "preprocessor_config.json").is_file():
        shutil.copyfile(source_dir / "preprocessor_config.json", out / "preprocessor_config.json")
    return report


def _probe_ids(llm: Any) -> list[int]:
    try:
        return llm.apply_chat_template(PROBE, add_generation_prompt=False, date_string="26 Jul 2024")
    except ValueError:  # no chat format: the same text as a plain completion
        text = " ".join(m["content"] for m in PROBE)
        return llm.tokenizer.encode(text, add_bos=llm.tokenizer.add_bos)


def _write_config(config: Any, checkpoint: Any, out: Path, dtype: torch.dtype) -> None:
    if hasattr(config, "to_hf"):
        import dataclasses

        d = dataclasses.replace(config, torch_dtype=str(dtype).removeprefix("torch.")).to_hf()
    else:  # a vision model: the base's own config.json (same names and shapes after a float merge)
        if getattr(config, "quantization", None) or not Path(checkpoint.path).is_dir():
            raise ValueError("merging a Llama 3.2 Vision adapter writes float weights from an HF folder only; use "
                             "--quantize none with an HF folder base")
        d = checkpoint.hf_config()
    (out / "config.json").write_text(json.dumps(d, indent=2) + "\n")
