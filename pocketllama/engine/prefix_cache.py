"""Prompt / prefix caching: reuse the K/V of a prefix instead of prefilling it again.

`SessionCache`: one sequence's cache kept between requests (multi-turn chat, `LLM` calls, the draft model).
`PrefixCache`: blocks of prompt tokens keyed by a chained hash, shared across requests (the server), LRU under
a byte budget. `save_prompt_cache` / `load_prompt_cache`: a prefilled prefix on disk, bound to the model and
tokenizer by fingerprints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .generate import (
    GenerationResponse,
    cache_length,
    context_limit,
    generation_budget,
    prefill,
    stream_generate,
)
from .kv_cache import KVCache
from .sampling import SamplingParams


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _copy_slots(src: KVCache, dst: KVCache, n: int, src_row: int = 0, dst_row: int = 0) -> None:
    for s, d in zip((*src.keys, *src.values), (*dst.keys, *dst.values), strict=True):
        d[dst_row, :, :n] = s[src_row, :, :n]


# ---------------------------------------------------------------------------------------------------------
# One sequence, kept between requests


def _modules_key(model: nn.Module) -> int:
    """Identity of the model's module tree: changes when any module is replaced or wrapped."""
    return hash(tuple(id(m) for m in model.modules()))


class SessionCache:
    """A batch-1 KV cache plus the ids whose K/V sit in its first slots. A request whose prompt starts with
    some of those ids prefills only the rest. Slots past `tokens` may hold stale K/V (a longer earlier
    answer, rejected drafts); they are overwritten before anything attends to them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cache: KVCache | None = None
        self.tokens: list[int] = []
        self._lock = threading.Lock()  # held by the live stream that owns the cache; others get a fresh one
        self._modules = _modules_key(model)

    def _check_model(self) -> None:
        """Forget the K/V when the model's modules changed since they were computed (an adapter loaded with
        `load_adapter`, a quantization swap): they belong to the old weights."""
        key = _modules_key(self.model)
        if key != self._modules:
            self._modules, self.tokens = key, []

    def reserve(self, length: int, exact: bool = False) -> KVCache:
        """A cache of at least `length` slots (exactly `length` with exact=True, for compiled steps), keeping
        the K/V of `tokens`."""
        old = self.cache
        if old is None or old.max_len < length or (exact and old.max_len != length):
            dtype = old.keys[0].dtype if old is not None else None
            new = self.model.make_cache(1, length, dtype) if dtype is not None else self.model.make_cache(1, length)
            keep = min(len(self.tokens), length - 1)
            if old is not None and keep:
                _copy_slots(old, new, keep)
            self.tokens = self.tokens[:keep] if old is not None else []
            self.cache = new
        return self.cache

    def prepare(self, prompt: Sequence[int], length: int, exact: bool = False) -> tuple[KVCache, int]:
        """(cache with >= `length` slots, how many leading ids of `prompt` it already holds)."""
        self._check_model()
        n = common_prefix(self.tokens, prompt)
        self.tokens = self.tokens[:n]
        cache = self.reserve(length, exact)
        return cache, min(n, len(self.tokens))

    def load(self, tokens: Sequence[int], keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """Install a prefix computed elsewhere: keys/values per layer, each (KV heads, n, head_dim)."""
        n = len(tokens)
        cache = self.reserve(max(n + 1, self.cache.max_len if self.cache is not None else 0))
        for buf, t in zip((*cache.keys, *cache.values), (*keys, *values), strict=True):
            buf[0, :, :n] = t.to(buf.dtype)
        self.tokens = list(tokens)

    def clear(self) -> None:
        self.cache, self.tokens = None, []

    def stream(self, tokenizer: Any, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
               compile: bool = False, truncate: str = "error", max_len: int | None = None,
               **kwargs: Any) -> Iterator[GenerationResponse]:
        """`stream_generate` on this session's cache: reuses the common prefix, then records the ids the
        cache holds as tokens come out (so an abandoned stream still leaves a valid record)."""
        params = params or SamplingParams()
        ids = [int(t) for t in prompt_ids]
        context = context_limit(self.model, max_len)
        if not ids or (truncate == "left" and len(ids) >= context) or not self._lock.acquire(blocking=False):
            yield from stream_generate(self.model, tokenizer, ids, params, compile=compile, truncate=truncate,
                                       max_len=max_len, **kwargs)
            return
        try:
            budget = generation_budget(len(ids), params.max_tokens, context)
            length = cache_length(len(ids) + max(budget, 1), context, compile)
            cache, n = self.prepare(ids, length, exact=compile)
            previous: int | None = None
            for r in stream_generate(self.model, tokenizer, ids, params, cache=cache, cached_tokens=n,
                                     compile=compile, truncate=truncate, max_len=max_len, **kwargs):
                if previous is None:
                    self.tokens = list(ids)  # the prompt is prefilled
                else:
                    self.tokens.append(previous)  # fed to the model to produce r.token
                previous = r.token
                yield r
        finally:
            self._lock.release()

    @property
    def busy(self) -> bool:
        return self._lock.locked()


# ---------------------------------------------------------------------------------------------------------
# Many sequences: block-hash prefix cache


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hits: int = 0  # lookups that reused at least one block
    hit_tokens: int = 0
    inserted_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    """K/V of full blocks of `block_size` prompt tokens, keyed by a hash chained over every block up to and
    including it (a key names the whole prefix, so equal keys mean equal prefixes). Shared across requests:

        n = prefix_cache.load(kv_cache, row, prompt)     # copies the longest cached prefix into the row
        ... prefill prompt[n:] into the row ...
        prefix_cache.insert(kv_cache, row, prompt)       # stores the row's full blocks for later requests

    Blocks are copied (the engine's cache is static per row, not paged). Least recently used blocks are
    evicted to stay under `max_bytes`; a block is always touched after its descendants, so eviction removes
    leaves before the blocks they extend. Not thread-safe: call it from the engine thread."""

    def __init__(self, max_bytes: int, block_size: int = 64, device: torch.device | str | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes, self.block_size, self.device = max_bytes, block_size, device
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # key -> (layers, 2, KV, block, hd)
        self.nbytes = 0
        self.stats = PrefixCacheStats()

    def _keys(self, tokens: Sequence[int], n_blocks: int) -> Iterator[bytes]:
        h = b"pocketllama-prefix"
        bs = self.block_size
        for i in range(n_blocks):
            block = torch.tensor(list(tokens[i * bs:(i + 1) * bs]), dtype=torch.int64).numpy().tobytes()
            h = hashlib.blake2b(h + block, digest_size=16).digest()
            yield h

    def match(self, tokens: Sequence[int], limit: int | None = None) -> list[bytes]:
        """Keys of the longest cached prefix of `tokens` (at most `limit` tokens; default len - 1, leaving
        one token to prefill so the model yields logits)."""
        limit = len(tokens) - 1 if limit is None else min(limit, len(tokens))
        found = []
        for key in self._keys(tokens, max(limit, 0) // self.block_size):
            if key not in self.blocks:
                break
            found.append(key)
        for key in reversed(found):  # descendants first: parents end up more recently used
            self.blocks.move_to_end(key)
        return found

    def load(self, cache: KVCache, row: int, tokens: Sequence[int], limit: int | None = None) -> int:
        """Copy the longest cached prefix of `tokens` into cache row `row`; returns its length in tokens."""
        keys = self.match(tokens, limit)
        bs = self.block_size
        for i, key in enumerate(keys):
            blk = self.blocks[key]
            for layer in range(len(cache.keys)):
                cache.keys[layer][row, :, i * bs:(i + 1) * bs] = blk[layer, 0]
                cache.values[layer][row, :, i * bs:(i + 1) * bs] = blk[layer, 1]
        n = len(keys) * bs
        self.stats.lookups += 1
        self.stats.hits += n > 0
        self.stats.hit_tokens += n
        return n

    def insert(self, cache: KVCache, row: int, tokens: Sequence[int]) -> int:
        """Store the full blocks of `tokens` whose K/V sit in slots 0..len(tokens)-1 of cache row `row`;
        returns how many blocks were new."""
        n_blocks = len(tokens) // self.block_size
        keys = list(self._keys(tokens, n_blocks))
        bs, new = self.block_size, 0
        for i, key in enumerate(keys):
            if key in self.blocks:
                continue
            blk = torch.stack([torch.stack((k[row, :, i * bs:(i + 1) * bs], v[row, :, i * bs:(i + 1) * bs]))
                               for k, v in zip(cache.keys, cache.values, strict=True)])  # (L, 2, KV, bs, hd)
            if self.device is not None:
                blk = blk.to(self.device)
            size = blk.numel() * blk.element_size()
            if size > self.max_bytes:
                break
            self._evict(self.max_bytes - size)
            self.blocks[key] = blk
            self.nbytes += size
            new += 1
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)
        self.stats.inserted_blocks += new
        return new

    def _evict(self, room: int) -> None:
        while self.blocks and self.nbytes > room:
            _, blk = self.blocks.popitem(last=False)
            self.nbytes -= blk.numel() * blk.element_size()
            self.stats.evicted_blocks += 1

    def clear(self) -> None:
        self.blocks.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.blocks)


# ---------------------------------------------------------------------------------------------------------
# Fingerprints and prompt-cache files

FORMAT = "pocketllama-prompt-cache"
VERSION = "1"
_SAMPLE = 256  # values sampled per tensor for the weights fingerprint


def config_fingerprint(config: Any) -> str:
    """sha256 of the architecture (every config field but dtype and quantization)."""
    if dataclasses.is_dataclass(config):
        d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
             if f.name not in ("torch_dtype", "quantization")}
    else:
        d = {k: v for k, v in vars(config).items() if k not in ("torch_dtype", "quantization")}
    blob = json.dumps(d, sort_keys=True, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o)
                      else repr(o))
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the special ids, stop ids, BOS convention and every token's bytes."""
    h = hashlib.sha256()
    head = {"vocab_size": tokenizer.vocab_size, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id,
            "stop": sorted(tokenizer.stop_ids), "add_bos": getattr(tokenizer, "add_bos", None),
            "special": sorted((getattr(tokenizer, "special_tokens", None) or {}).items())}
    h.update(json.dumps(head, sort_keys=True).encode())
    token_bytes = getattr(tokenizer, "token_bytes", None)
    if token_bytes is not None:
        for i in range(tokenizer.vocab_size):
            try:
                h.update(len(b := token_bytes(i)).to_bytes(4, "little") + b)
            except (KeyError, IndexError, ValueError):
                h.update(b"\xff\xff\xff\xff")
    return h.hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over strided samples of every tensor of the state dict, floats rounded to bfloat16, so a
    bf16 checkpoint loaded in float32 or bfloat16 matches while another checkpoint (a fine-tune, base vs
    instruct, a quantized load) does not."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE].cpu()
        if sample.is_floating_point():
            sample = sample.to(torch.bfloat16).view(torch.int16)
        h.update(name.encode() + str(tuple(t.shape)).encode() + sample.contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class PromptCacheFile:
    """A prefilled prefix read from disk: ids, per-layer K/V (KV heads, n, head_dim), metadata strings."""

    tokens: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    metadata: dict[str, str]

    def install(self, session: SessionCache) -> None:
        session.load(self.tokens, self.keys, self.values)


def save_prompt_cache(path: str | Path, model: nn.Module, tokenizer: Any, tokens: Sequence[int], *,
                      metadata: dict[str, str] | None = None, prefill_step_size: int = 512) -> Path:
    """Prefill `tokens` and write their K/V to `path` (safetensors) with metadata binding the file to this
    model (architecture and weights fingerprints) and tokenizer."""
    from safetensors.torch import save_file

    tokens = [int(t) for t in tokens]
    if not tokens:
        raise ValueError("cannot cache an empty prompt")
    context = context_limit(model)
    if len(tokens) >= context:
        raise ValueError(f"the prompt has {len(tokens)} tokens but the model's context holds {context}; "
                         "shorten it")
    cache = model.make_cache(1, len(tokens))
    with torch.no_grad():
        prefill(model, tokens, cache, 0, prefill_step_size)
    tensors = {"tokens": torch.tensor(tokens, dtype=torch.int64)}
    for i, (k, v) in enumerate(zip(cache.keys, cache.values, strict=True)):
        tensors[f"layers.{i}.keys"] = k[0].contiguous()
        tensors[f"layers.{i}.values"] = v[0].contiguous()
    meta = {"format": FORMAT, "version": VERSION, "model_config_sha256": config_fingerprint(model.config),
            "weights_sha256": weights_fingerprint(model), "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
            "n_tokens": str(len(tokens)), "dtype": str(cache.keys[0].dtype).removeprefix("torch."),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta.update(metadata or {})
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_prompt_cache(path: str | Path, model: nn.Module, tokenizer: Any) -> PromptCacheFile:
    """Read a file written by `save_prompt_cache`, refusing one made for another model or tokenizer."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt cache {path} does not exist; make one with "
                                "`pocketllama cache-prompt -m MODEL --file prompt.txt -o prompt.kv`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a pocketllama prompt cache (no '{FORMAT}' metadata)")
            if meta.get("version") != VERSION:
                raise ValueError(f"prompt cache {path} has format version {meta.get('version')!r}; this pocketllama "
                                 f"reads version {VERSION}: remake it with `pocketllama cache-prompt`")
            checks = (("model_config_sha256", lambda: config_fingerprint(model.config), "model architecture"),
                      ("weights_sha256", lambda: weights_fingerprint(model), "model weights"),
                      ("tokenizer_sha256", lambda: tokenizer_fingerprint(tokenizer), "tokenizer"))
            for key, mine, what in checks:
                if meta.get(key) != mine():
                    made = f" (made with {meta['model']})" if meta.get("model") else ""
                    raise ValueError(f"prompt cache {path} was made for another model{made}: its {what} "
                                     "fingerprint differs from the loaded model's; remake it with "
                                     "`pocketllama cache-prompt -m MODEL` using this model (and the same "
                                     "quantization)")
            tokens = f.get_tensor("tokens").tolist()
            n_layers = model.config.num_hidden_layers
            keys = [f.get_tensor(f"layers.{i}.keys") for i in range(n_layers)]
            values = [f.get_tensor(f"layers.{i}.values") for i in range(n_layers)]
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable prompt cache (safetensors: {e})") from None
    return PromptCacheFile(tokens=tokens, keys=keys, values=values, metadata=dict(meta))
