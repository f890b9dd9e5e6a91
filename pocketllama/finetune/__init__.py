"""Fine-tuning: SFT data with assistant-only loss masks, LoRA / QLoRA / full fine-tuning, PEFT-format adapters,
merging, and the same loop across processes under torchrun (`pocketllama finetune`, `pocketllama merge`)."""

from .data import Example, collate, encode_chat, load_examples
from .lora import LoRALinear, apply_lora, merge_lora
from .peft_format import load_adapter, save_adapter
from .trainer import FinetuneConfig, FinetuneResult, finetune

__all__ = ["Example", "FinetuneConfig", "FinetuneResult", "LoRALinear", "apply_lora", "collate", "encode_chat",
           "finetune", "load_adapter", "load_examples", "merge_lora", "save_adapter"]
