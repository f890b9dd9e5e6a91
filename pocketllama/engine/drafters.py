"""Drafters for speculative decoding: a smaller (or quantized) model with its own KV cache, and prompt lookup
(n-gram matches in the prompt and the output so far). `make_drafter` turns `load(..., draft=...)` values
into one, refusing a draft whose vocabulary or tokenizer differs from the target's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .generate import _device, cache_length, prefill
from .prefix_cache import SessionCache, common_prefix, tokenizer_fingerprint
from .sampling import LogitsProcessor
from .speculative import Distribution, Processors, _Fork


class ModelDrafter:
    """Drafts with a model of the same vocabulary. Its cache is a `SessionCache`, so the prompt prefix it
    already holds (the previous turn, the previous round) is never fed again: each round feeds only the
    ids committed since, then one token per draft."""

    # A short catch-up (ids committed since the last round, a pause's worth) goes in pieces of SMALL_CHUNK:
    # quantized drafts run few-row inputs on GEMV kernels (quant.kernels.SMALL_M) and larger ones on a
    # dequantize-then-GEMM path that costs seconds per call on CPU, whatever the row count.
    SMALL_CHUNK, SMALL_CATCHUP = 8, 48

    def __init__(self, model: nn.Module, name: str = "draft", prefill_step_size: int = 512,
                 shares_kv: bool = False) -> None:
        self.model, self.name, self.chunk = model, name, prefill_step_size
        # A self-draft (the target's own checkpoint, quantized) has the target's architecture, so it can take
        # the target's keys/values of committed ids instead of computing its own (`adopt`).
        self.shares_kv = shares_kv
        self.session = SessionCache(model)
        self.context = int(model.config.max_position_embeddings)
        self.catchup = 0
        self.processors = Processors([])
        self.fork: _Fork | None = None

    def start(self, prompt: list[int], total_len: int, processors: list[LogitsProcessor]) -> None:
        self.session.reserve(cache_length(min(total_len, self.context), self.context))
        self.processors, self.fork = Processors(processors), None

    def propose(self, seq: list[int], k: int, dist: Distribution, generated: torch.Tensor, g: int
                ) -> tuple[list[int], torch.Tensor | None]:
        cache = self.session.reserve(1)  # (sized by start)
        k = min(k, cache.max_len - len(seq) + 1)  # the last draft is never fed: positions < len(seq) + k - 1
        if k <= 0:
            return [], None
        c = min(common_prefix(self.session.tokens, seq), len(seq) - 1)
        self.catchup = len(seq) - c
        device = _device(self.model)
        self.fork = fork = self.processors.fork()
        drafted, qs = [], []
        with torch.no_grad():
            chunk = self.SMALL_CHUNK if self.catchup <= self.SMALL_CATCHUP else self.chunk
            logits = prefill(self.model, seq, cache, c, chunk)  # (1, V) after the last committed id
            for i in range(k):
                x = fork(logits, generated[:, :g + i])
                if dist.greedy:
                    d = x.argmax(dim=-1)  # (1,)
                else:
                    q = dist.probs(x)  # (1, V)
                    d = dist.draw(q)
                    qs.append(q)
                generated[0, g + i] = d[0]
                drafted.append(d)
                if i + 1 < k:
                    position = torch.full((1, 1), len(seq) + i, dtype=torch.long, device=device)
                    logits = self.model(d.view(1, 1), positions=position, cache=cache)[:, -1].float()
        ids = torch.cat(drafted).tolist()
        self.session.tokens = [*seq, *ids[:-1]]  # every id fed so far
        return ids, torch.cat(qs) if qs else None

    def settle(self, intact: int) -> None:
        self.processors.settle(self.fork, intact)
        self.fork = None

    def adopt(self, cache: Any, seq: list[int]) -> bool:
        """Copy the target's K/V (`cache`, batch row 0, holding every id of `seq` but the last) for the ids
        this draft has not fed yet, so `propose` feeds only the last one: no prompt prefill or catch-up through
        the draft. The draft then conditions on the target's exact past, which can only raise acceptance; the
        target still verifies every token. False (nothing done) when the caches do not match."""
        own = self.session.reserve(1)
        n = len(seq) - 1
        c = common_prefix(self.session.tokens, seq[:n])
        if n <= c:
            return True
        if (len(own.keys) != len(cache.keys) or cache.batch_size != 1 or own.keys[0].shape[1:] != cache.keys[0].shape[1:]
                or own.keys[0].dtype != cache.keys[0].dtype or n > min(own.max_len, cache.max_len)):
            return False
        for dst, src in zip((*own.keys, *own.values), (*cache.keys, *cache.values), strict=True):
            dst[0, :, c:n] = src[0, :, c:n]
        self.session.tokens = list(seq[:n])
        return True


class PromptLookupDrafter:
    """Prompt lookup decoding: find the latest earlier occurrence of the last n ids (n = max_ngram down to
    min_ngram) in prompt + output and propose the ids that followed it. Costs no model call, so it pays
    whenever the output copies its input (summaries, code edits, extraction). Proposals are deterministic
    (q is one-hot), which rejection sampling handles exactly."""

    name = "prompt-lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.catchup = 0

    def start(self, prompt: list[int], total_len: int, processors: list[LogitsProcessor]) -> None:
        pass

    def propose(self, seq: list[int], k: int, dist: Distribution, generated: torch.Tensor, g: int
                ) -> tuple[list[int], torch.Tensor | None]:
        ids = lookup(np.asarray(seq, dtype=np.int64), k, self.max_ngram, self.min_ngram)
        if ids:
            generated[0, g:g + len(ids)] = torch.tensor(ids, dtype=torch.long)
        return ids, None

    def settle(self, intact: int) -> None:
        pass


def lookup(seq: np.ndarray, k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Up to k ids that followed the latest earlier occurrence of seq's last n ids, longest n first."""
    for n in range(min(max_ngram, len(seq) - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # window i = seq[i:i+n], i + n < len
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return seq[start:start + k].tolist()
    return []


# ---------------------------------------------------------------------------------------------------------
# Building a drafter for a target


def check_compatible(target: Any, draft: Any, target_name: str = "the target", draft_name: str = "the draft"
                     ) -> None:
    """Refuse a draft that cannot propose the target's tokens: vocabulary sizes or tokenizers differ.
    `target` / `draft` are `LLM`s (model + tokenizer) or bare models (vocabulary check only)."""
    t_model = target if isinstance(target, nn.Module) else target.model
    d_model = draft if isinstance(draft, nn.Module) else draft.model
    tv, dv = int(t_model.config.vocab_size), int(d_model.config.vocab_size)
    if tv != dv:
        raise ValueError(f"draft model {draft_name} has a vocabulary of {dv} tokens but {target_name} has {tv}; "
                         "speculative decoding needs the same tokenizer in both (e.g. Llama 3.2 1B drafting for "
                         "Llama 3.1 8B), or use --draft-model self-int4 / --prompt-lookup")
    t_tok, d_tok = getattr(target, "tokenizer", None), getattr(draft, "tokenizer", None)  # (None for models)
    if t_tok is None or d_tok is None:
        return
    if tokenizer_fingerprint(t_tok) != tokenizer_fingerprint(d_tok):
        where = _first_difference(t_tok, d_tok)
        raise ValueError(f"draft model {draft_name} uses a different tokenizer than {target_name} ({where}); "
                         "speculative decoding needs identical token ids in both")


def _first_difference(a: Any, b: Any) -> str:
    for attr in ("vocab_size", "bos_id", "eos_id", "stop_ids", "special_tokens"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            return f"{attr}: {getattr(b, attr, None)!r} vs {getattr(a, attr, None)!r}"
    for i in range(a.vocab_size):
        if a.token_bytes(i) != b.token_bytes(i):
            return f"token {i} is {b.token_bytes(i)!r} vs {a.token_bytes(i)!r}"
    return "the BOS convention differs"


SELF_PREFIX = "self-"


def make_drafter(draft: Any, target: Any, *, device: str | torch.device = "cpu",
                 prompt_lookup_ngram: int = 3) -> Any:
    """A drafter for `target` (an LLM) from what `load(..., draft=...)` accepts:

    - "prompt-lookup": n-gram lookup in the prompt and output (no second model);
    - "self-int4" (or "self-<recipe>", e.g. "self-int8"): the target's own checkpoint loaded quantized;
    - an `LLM`, or a model source (folder, .gguf, alias) loaded in the target's dtype;
    - an object with `propose` (a drafter already).
    """
    if draft is None:
        return None
    if hasattr(draft, "propose"):
        return draft
    if isinstance(draft, str) and draft in ("prompt-lookup", "lookup", "ngram"):
        return PromptLookupDrafter(max_ngram=prompt_lookup_ngram)
    from ..llm import LLM, load, load_model

    if isinstance(draft, str) and draft.startswith(SELF_PREFIX):
        recipe = draft[len(SELF_PREFIX):]
        # A draft only proposes tokens (the target verifies each one), so "int4" is the leanest recipe: int4
        # linears and an int4 token table / output (1B: 0.75 GB per token read, vs 0.87 GB with an int8
        # table), and its int4 weights take the int8-activation kernels where the CPU has them.
        recipe = "int4-g32-e4g128" if recipe == "int4" else recipe
        model, _ = load_model(target.source, dtype=target.dtype, device=device, quantize=recipe,
                              int8_activations=True)
        check_compatible(target.model, model, str(target.source), draft)
        return ModelDrafter(model, name=draft, shares_kv=True)
    if isinstance(draft, str | os.PathLike):
        name = str(draft)
        draft = load(draft, dtype=target.dtype, device=device)
        check_compatible(target, draft, str(target.source), name)
        return ModelDrafter(draft.model, name=Path(name).name)
    if isinstance(draft, LLM):
        check_compatible(target, draft, str(target.source), str(draft.source))
        return ModelDrafter(draft.model, name=Path(draft.source).name)
    raise TypeError(f"draft must be 'prompt-lookup', 'self-int4', a model source, an LLM or a drafter; "
                    f"got {type(draft).__name__}")
