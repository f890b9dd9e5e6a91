"""Flags shared by commands (model, dtype, threads, sampling) and the error boundary of the CLI."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="model: folder (HF or Meta), .gguf file, HF repo id in the local cache, or alias "
                        "(default: smollm2-135m; see `pocketllama models`)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weight/compute dtype (default: the checkpoint's own; quantized GGUF -> float32)")
    p.add_argument("--quantize", default=None, metavar="RECIPE",
                   help="quantize float weights while loading: int8, int4-g32 (Meta's 4-bit scheme), int4-g64, "
                        "... (see `pocketllama quantize --help`); 'none' loads a quantized GGUF's weights as floats "
                        "(default: as stored)")
    p.add_argument("--int8-activations", action="store_true",
                   help="int4 weights multiply decode activations quantized to int8 (llama.cpp's Q8 scheme; AVX-512 "
                        "VNNI): faster decode, ~0.5%% error per output; needs int4 weights (an int4 --quantize "
                        "recipe or a Q4_0/Q4_1 GGUF)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model's generation_config.json, else greedy)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, (0, 1]")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p * p(top token)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="HF repetition penalty (1 = off)")
    g.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate (default 256)")
    g.add_argument("--seed", type=int, default=None, help="random seed: same seed, same output")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")


def add_speculation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding and prompt caching (the same output, sooner)")
    g.add_argument("--draft-model", default=None, metavar="M",
                   help="draft model with the same tokenizer (folder, .gguf, alias), or self-int4 / self-int8: "
                        "this model, quantized, drafts for itself")
    g.add_argument("--prompt-lookup", action="store_true",
                   help="draft by n-gram lookup in the prompt (summaries, code edits); no second model")
    g.add_argument("--num-draft", type=int, default=7, metavar="K",
                   help="most tokens drafted per round, 1-15 (adapted to the acceptance rate; default 7)")
    g.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="a prefix saved by `pocketllama cache-prompt`: prompts that start with it skip its prefill")


def draft_from_args(args: argparse.Namespace) -> str | None:
    """The `load(draft=...)` value the speculation flags ask for (None without them)."""
    lookup, model = getattr(args, "prompt_lookup", False), getattr(args, "draft_model", None)
    if lookup and model:
        raise ValueError("--draft-model and --prompt-lookup are alternatives; pass one of them")
    return "prompt-lookup" if lookup else model


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed", "stop")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def load_from_args(args: argparse.Namespace):
    import torch

    from ..llm import load

    if args.threads:
        torch.set_num_threads(args.threads)
    draft = draft_from_args(args)
    extra = {"draft": draft, "num_draft": args.num_draft} if draft is not None else {}
    if getattr(args, "int8_activations", False):
        extra["int8_activations"] = True
    return load(args.model, dtype=args.dtype, device=args.device, quantize=quantize_arg(args.quantize), **extra)


def quantize_arg(value: str | None) -> Any:
    """The `load(quantize=...)` value of a --quantize flag: None (as stored), False ('none') or a recipe."""
    if value is None:
        return None
    return False if value.lower() in ("none", "false", "off") else value


def cli_errors(fn: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Bad input ends with one clear line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return fn(argv)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        except (ValueError, FileNotFoundError, TypeError, OSError) as e:
            print(f"pocketllama: error: {e}", file=sys.stderr)
            return 2

    return wrapper
