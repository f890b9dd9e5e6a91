"""Weight-only quantization: int8 (per row or per group) and int4 groupwise modules on PyTorch's CPU kernels,
recipes recorded in config.json, GGUF Q8_0/Q4_0/Q4_1 blocks kept quantized, and a memory planner."""

from .handler import choose_plan, prepare_load, quantize_model, quantize_state_dict, swap_modules
from .modules import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear
from .recipe import NAMED_RECIPES, QSpec, Recipe, parse_recipe

__all__ = ["NAMED_RECIPES", "Int4Embedding", "Int4Linear", "Int8Embedding", "Int8Linear", "QSpec", "Recipe",
           "choose_plan", "parse_recipe", "prepare_load", "quantize_model", "quantize_state_dict", "swap_modules"]
